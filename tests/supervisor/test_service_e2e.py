"""The daemon as a service: sd_notify on a real datagram socket, metrics over HTTP, config files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import shmcache
from tests import models
from tests.supervisor.daemon import ROOT, Daemon, wait_until


class NotifySocket:
    """What systemd would read: every datagram the daemon sends, with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return [m for _, m in self.messages]
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        self.drain()
        return [line for _, m in self.messages for line in m.split("\n")]

    def wait_for(self, line: str, timeout: float = 60.0) -> float:
        def seen() -> float | None:
            self.drain()
            for at, m in self.messages:
                if line in m.split("\n"):
                    return at
            return None

        return wait_until(seen, timeout, f"{line!r} on the notify socket")

    def count_since(self, line: str, since: float) -> int:
        self.drain()
        return sum(1 for at, m in self.messages if at >= since and line in m.split("\n"))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return models.save(models.mlp((32, 64, 8), seed=4), tmp_path / "m.onnx")


def test_ready_only_after_warm_up_and_watchdog_fed(
    tmp_path: Path, notify: NotifySocket, model: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    # heartbeat_timeout past the workers' stops below: hung, not yet replaced
    d = Daemon(tmp_path, {"m": model}, workers=2, env=env, extra=["--heartbeat-timeout", "60"])
    try:
        notify.wait_for("READY=1")
        # READY=1 promises every model warm on every worker: the daemon must say so too.
        status = d.status()
        active = [w["state"] for w in status["workers"] if w["role"] == "active"]
        assert status["ready"] and active == ["ready", "ready"]
        log = d.log_text()
        assert log.index("worker") < log.index("ready: 2 worker(s)")
        assert any(line.startswith("STATUS=2/2 workers ready") for line in notify.lines())
        before_ready = notify.lines()[: notify.lines().index("READY=1")]
        assert "READY=1" not in before_ready[:-1]
        start = time.monotonic()
        wait_until(lambda: notify.count_since("WATCHDOG=1", start) >= 4, 10, "watchdog pings")

        # One hung worker (stopped, so it sends no heartbeat) is the supervisor's to replace:
        # the watchdog stays fed by the other. Every worker hung stops it.
        pids = d.worker_pids()
        os.kill(pids[0], signal.SIGSTOP)
        try:
            time.sleep(4.0)  # past ANSWERING_WITHIN (3.5 s)
            notify.drain()
            one_hung = time.monotonic()
            time.sleep(1.0)
            assert notify.count_since("WATCHDOG=1", one_hung) >= 1
            os.kill(pids[1], signal.SIGSTOP)
            time.sleep(4.5)  # ANSWERING_WITHIN + a few watchdog intervals
            notify.drain()  # stamp what arrived meanwhile before the quiet window starts
            quiet_since = time.monotonic()
            time.sleep(1.0)
            assert notify.count_since("WATCHDOG=1", quiet_since) == 0
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: notify.count_since("WATCHDOG=1", resumed) >= 2, 10, "watchdog resumes")

        reload_at = time.monotonic()
        d.signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        wait_until(lambda: notify.count_since("READY=1", reload_at) >= 1, 60, "READY after reload")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(60) == 0
        notify.wait_for("STOPPING=1", 5)
    finally:
        d.stop()
    assert d.segments() == []


def scrape(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_endpoint_moves_with_traffic(tmp_path: Path, model: Path) -> None:
    d = Daemon(tmp_path, {"m": model}, workers=2, extra=["--metrics-address", "127.0.0.1:0"])
    try:
        d.wait_ready()
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", d.log_text()).group(1))  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        assert scrape(f"{base}/healthz")[0] == 200
        assert scrape(f"{base}/readyz")[0] == 200
        assert scrape(f"{base}/nope")[0] == 404
        _, text = scrape(f"{base}/metrics")
        before = sample(text, "shmcache_requests_total", model="m", outcome="ok")
        with shmcache.Client(str(d.socket)) as c:
            for _ in range(25):
                c.run("m", None, {"x": np.zeros((1, 32), np.float32)})
            with pytest.raises(shmcache.BadShape):
                c.run("m", None, {"x": np.zeros((1, 31), np.float32)})

        def moved() -> str | None:
            _, t = scrape(f"{base}/metrics")
            return t if sample(t, "shmcache_requests_total", model="m", outcome="ok") >= before + 25 else None

        text = wait_until(moved, 10, "request counter to move")
        assert sample(text, "shmcache_requests_total", model="m", outcome="bad_shape") >= 1
        assert sample(text, "shmcache_request_duration_seconds_count", model="m") >= 25
        assert sample(text, "shmcache_segment_bytes", model="m") > 64 * 32 * 4
        assert sample(text, "shmcache_ready") == 1
        assert sample(text, "shmcache_worker_memory_bytes", kind="uss") > 0
    finally:
        assert d.stop() == 0


def test_config_file_and_environment(tmp_path: Path, model: Path) -> None:
    config = tmp_path / "shmcache.toml"
    config.write_text(f'workers = 1\nstate_dir = "state"\n\n[models]\nm = "{model.name}"\n')
    d = Daemon(tmp_path, extra=["--config", str(config)], env={"SHMCACHE_WORKERS": "2"})
    try:
        d.wait_ready()
        status = d.status()
        assert status["target_workers"] == 2  # environment beats the file
        assert [m["name"] for m in status["models"]] == ["m"]
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("text, key", [
    ("workers = 0\n", "workers"),
    ("workers = 'four'\n", "workers"),
    ("wrokers = 2\n", "wrokers"),
    ("keep = -1\n", "keep"),
    ("workers = \n", "line 1"),
])
def test_bad_config_file_is_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "shmcache.cli", "serve", "--config", str(config),
         "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 78  # EX_CONFIG: the unit does not restart on it
    assert key in done.stderr and "ConfigError" in done.stderr
    assert not (tmp_path / "s.sock").exists()


def locked_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmLck:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def test_lock_memory_keeps_segments_resident(tmp_path: Path, model: Path) -> None:
    d = Daemon(tmp_path, {"m": model}, workers=1, extra=["--lock-memory"]).wait_ready()
    try:
        size = d.status()["models"][0]["size"]
        assert locked_bytes(d.proc.pid) >= size
        # Publishing twice with keep=1 drops v1: its pages must be unlocked, not held forever.
        for seed in (5, 6):
            path = models.save(models.mlp((32, 64, 8), seed=seed), tmp_path / f"p{seed}.onnx")
            done = subprocess.run(
                [sys.executable, "-m", "shmcache.cli", "publish", "m", str(path), "--socket",
                 str(d.socket)], capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert done.returncode == 0, done.stderr
        page = os.sysconf("SC_PAGE_SIZE")
        rounded = -(-size // page) * page
        assert rounded * 2 <= locked_bytes(d.proc.pid) < rounded * 3
    finally:
        assert d.stop() == 0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmcache.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_health_and_status_commands(tmp_path: Path, model: Path) -> None:
    sock = str(tmp_path / "d.sock")
    down = cli("health", "--socket", sock)
    assert down.returncode == 1 and "not live" in down.stderr
    d = Daemon(tmp_path, {"m": model}, workers=1).wait_ready()
    try:
        assert cli("health", "--socket", sock).returncode == 0
        ready = cli("health", "--ready", "--socket", sock)
        assert ready.returncode == 0 and ready.stdout.strip() == "ready"
        status = json.loads(cli("status", "--json", "--socket", sock).stdout)
        assert status["ready"] is True and status["models"][0]["name"] == "m"
        assert {"pid", "state", "role", "uss", "pss", "shared", "versions"} <= set(status["workers"][0])
        table = cli("status", "--socket", sock).stdout
        assert "private (USS) MiB" in table and "m=v1" in table
    finally:
        assert d.stop() == 0
    assert cli("health", "--socket", sock).returncode == 1
