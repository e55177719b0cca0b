"""scripts/shmcache.service and scripts/install-service: the unit verifies, the installer's
dry run changes nothing and a real run below a scratch root is idempotent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.arbiter import EXIT_BOOT_LOOP, EXIT_STARTUP, FAST_STOP_SECONDS
from supervisor.config import ServeConfig

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
UNIT = SCRIPTS / "shmcache.service"
INSTALL = SCRIPTS / "install-service"
EXEC_START = "ExecStart=/usr/local/bin/shmcache serve --config /etc/shmcache/shmcache.toml"


def service_section() -> dict[str, str]:
    settings: dict[str, str] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            k, _, v = line.partition("=")
            assert k not in settings, f"{k} set twice"
            settings[k] = v
    return settings


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    s = service_section()
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillMode"] == "mixed"
    assert f"ExecStart={s['ExecStart']}" == EXEC_START
    assert (s["User"], s["Group"]) == ("shmcache", "shmcache")
    assert s["RuntimeDirectory"] == "shmcache" and s["StateDirectory"] == "shmcache"
    assert int(s["WatchdogSec"]) > 0
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["ProtectHome"] == "yes" and "/dev/shm" in s["ReadWritePaths"].split()
    # The arbiter SIGKILLs stragglers at graceful_timeout + 1 s and waits up to 5 s more.
    assert int(s["TimeoutStopSec"]) > ServeConfig().graceful_timeout + 1 + FAST_STOP_SECONDS
    assert "#LimitMEMLOCK=" in UNIT.read_text()
    # Exits that another start would not mend are not restarted; a crash (1) is.
    assert s["Restart"] == "on-failure"
    kept_down = {int(code) for code in s["RestartPreventExitStatus"].split()}
    assert {EXIT_STARTUP, EXIT_BOOT_LOOP, 2} <= kept_down and 1 not in kept_down


@pytest.mark.parametrize("setting", ["PrivateDevices", "PrivateIPC", "DynamicUser", "RemoveIPC",
                                     "TemporaryFileSystem", "InaccessiblePaths"])
def test_unit_keeps_dev_shm_shared_with_clients(setting: str) -> None:
    """Each of these gives the service its own /dev/shm or removes its segments (DynamicUser
    implies RemoveIPC=yes)."""
    assert setting not in service_section()


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify needs ExecStart's binary to exist: point it at this Python."""
    assert EXEC_START in text
    unit = tmp_path / "shmcache.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/shmcache", f"ExecStart={sys.executable}"))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def warnings_about_unit(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "shmcache.service" in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    done = verify(tmp_path, UNIT.read_text())
    assert done.returncode == 0, done.stderr
    assert warnings_about_unit(done.stderr) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported."""
    done = verify(tmp_path, UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes"))
    assert any("ProtectHom" in line for line in warnings_about_unit(done.stderr)), done.stderr


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=60)


def test_install_dry_run_prints_every_step_and_changes_nothing() -> None:
    before = {p: os.path.exists(p) for p in ("/etc/systemd/system/shmcache.service",
                                             "/etc/shmcache/shmcache.toml")}
    done = run_install("--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "groupadd --system shmcache" in out or "group shmcache exists" in out
    assert "useradd --system --gid shmcache" in out or "user shmcache exists" in out
    if not before["/etc/systemd/system/shmcache.service"]:
        assert f"would run: install -D -m 0644 {UNIT} /etc/systemd/system/shmcache.service" in out
    if not before["/etc/shmcache/shmcache.toml"]:
        assert "/etc/shmcache/shmcache.toml" in out and "would run: install -m 0644" in out
    assert "daemon-reload" in out  # either would run it or says why it is skipped
    assert "dry run: nothing was changed" in out
    assert {p: os.path.exists(p) for p in before} == before


def test_install_below_a_root_is_idempotent_and_keeps_an_edited_config(tmp_path: Path) -> None:
    first = run_install("--root", str(tmp_path))
    assert first.returncode == 0, first.stderr
    unit = tmp_path / "etc/systemd/system/shmcache.service"
    config = tmp_path / "etc/shmcache/shmcache.toml"
    assert unit.read_bytes() == UNIT.read_bytes()
    assert config.read_bytes() == (SCRIPTS / "shmcache.toml").read_bytes()
    config.write_text("workers = 8\n")
    second = run_install("--root", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout and "left as it is" in second.stdout
    assert config.read_text() == "workers = 8\n"


def test_install_refuses_unknown_arguments() -> None:
    done = run_install("--frobnicate")
    assert done.returncode == 2 and "unknown argument" in done.stderr
