"""Publishing new weight versions into a running daemon, with real clients, files and signals."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import shmcache
from shmcache import errors, hugepages
from tests import models
from shmcache.paths import control_socket_path
from supervisor.arbiter import EXIT_STARTUP
from tests.supervisor.daemon import ROOT, Daemon, serving, wait_until
from worker.runtime import SessionSettings
from worker import heap
from worker.server import PREPARE_PRECEDENCE

SIZES = (64, 256, 32)


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, Path]:
    """Two weight sets of one graph (A, B), and files that must not go live."""
    bad_sig = models.mlp((64, 256, 16), seed=3)  # output dim changed
    unloadable = models.mlp(SIZES, seed=4)
    unloadable.graph.node[0].op_type = "NoSuchOperator"  # parses; ORT refuses it
    return {
        "A": models.save(models.mlp(SIZES, seed=1), tmp_path / "a.onnx"),
        "B": models.save(models.mlp(SIZES, seed=2), tmp_path / "b.onnx"),
        "bad_sig": models.save(bad_sig, tmp_path / "bad_sig.onnx"),
        "unloadable": models.save(unloadable, tmp_path / "unloadable.onnx"),
    }


@pytest.fixture
def daemon(tmp_path: Path, weights: dict[str, Path]) -> Iterator[Daemon]:
    with serving(tmp_path, {"m": weights["A"]}) as d:
        yield d


def reference(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), SessionSettings(intra_op_threads=1).options(
        prepacked=True), providers=["CPUExecutionProvider"])


def publish(d: Daemon, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcache.cli", "publish", "m", str(path), "--socket",
         str(d.socket), *extra], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def publish_in_background(d: Daemon, path: Path, *extra: str) -> subprocess.Popen[str]:
    """``shmcache publish`` started, not waited for; its stdout and stderr are pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "shmcache.cli", "publish", "m", str(path), "--socket",
         str(d.socket), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def publish_while_preparing(d: Daemon, path: Path) -> subprocess.Popen[str]:
    proc = publish_in_background(d, path)
    wait_until(lambda: d.control("publish_status", model="m")["phase"] == "preparing",
               60, "preparing")
    return proc


def assert_serves(d: Daemon, version: int, weights_file: Path) -> None:
    """An unpinned call is answered by ``version``, bit for bit as ``weights_file`` computes."""
    x = np.ones((1, 64), np.float32)
    y, served = call(d, x)
    assert served == version
    assert y.tobytes() == reference(weights_file).run(None, {"x": x})[0].tobytes()


def current_version(d: Daemon) -> int:
    return next(m["version"] for m in d.status()["models"] if m["name"] == "m")


def call(d: Daemon, x: np.ndarray, **kw: object) -> tuple[np.ndarray, int]:
    with shmcache.Client(str(d.socket)) as c:
        (y,), version = c.run_with_version("m", None, {"x": x}, **kw)  # type: ignore[arg-type]
    return y, version


def test_swaps_under_load_are_atomic_and_exact(daemon: Daemon, weights: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 64)).astype(np.float32) for _ in range(6)]
    expected = {name: [reference(weights[name]).run(None, {"x": x})[0].tobytes() for x in inputs]
                for name in ("A", "B")}
    published_at: dict[int, float] = {1: 0.0}  # version -> when its publish returned
    records: list[tuple[float, int, int, bytes]] = []  # (sent, input index, version, output)
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        local = np.random.default_rng(seed)
        with shmcache.Client(str(daemon.socket), timeout=60) as c:
            while not stop.is_set():
                i = int(local.integers(len(inputs)))
                sent = time.monotonic()
                try:
                    (y,), v = c.run_with_version("m", None, {"x": inputs[i]})
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    with lock:
                        failures.append(exc)
                    continue
                with lock:
                    records.append((sent, i, v, y.tobytes()))

    threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(20):
            target = weights["B" if k % 2 == 0 else "A"]
            done = publish(daemon, target)
            assert done.returncode == 0, done.stderr
            version = int(done.stdout.strip())
            published_at[version] = time.monotonic()
            assert version == k + 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert len(records) > 100
    versions_seen = {v for _, _, v, _ in records}
    assert len(versions_seen) > 5
    for sent, i, v, out in records:
        weights_of_v = "A" if v % 2 == 1 else "B"
        assert out == expected[weights_of_v][i], f"v{v} answered with other weights"
        newest_returned = max(ver for ver, at in published_at.items() if at <= sent)
        assert v >= newest_returned, f"call sent after v{newest_returned} went live got v{v}"
    # keep=1: only the current and one previous version remain in shared memory.
    assert len([s for s in daemon.segments() if ".m.v" in s]) == 2


def mapped_versions(pid: int) -> set[int]:
    """Versions of model m whose segment the process still maps (ORT's mappings included)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        for part in line.split():
            if part.startswith("/dev/shm/shmcache.") and ".m.v" in part:
                found.add(int(part.split(".m.v", 1)[1].split(".", 1)[0]))
    return found


def test_dropped_versions_are_unmapped_by_every_worker(
    daemon: Daemon, weights: dict[str, Path]
) -> None:
    """keep=1: after three publishes v1 and v2 are dropped; every worker, the standby too,
    frees their sessions and mappings (off its event loop), so their pages return."""
    for path in (weights["B"], weights["A"], weights["B"]):
        assert publish(daemon, path).returncode == 0
    pids = daemon.worker_pids(role=None)
    assert pids
    wait_until(lambda: all(mapped_versions(pid) <= {3, 4} for pid in pids), timeout=20,
               what="every worker to unmap v1 and v2")
    active = daemon.worker_pids()
    assert all(mapped_versions(pid) == {3, 4} for pid in active)
    assert call(daemon, np.ones((1, 64), np.float32))[1] == 4


def test_pre_packs_of_dropped_versions_leave_the_cache(
    daemon: Daemon, weights: dict[str, Path], tmp_path: Path
) -> None:
    """keep=1: after publishing B then C, A's version is dropped and so is its pre-pack; the
    cache holds the loaded versions' only (each is ~2x the model on disk)."""
    c = models.save(models.mlp(SIZES, seed=5), tmp_path / "c.onnx")
    cache = tmp_path / "state" / "cache"
    assert len(list(cache.iterdir())) == 1
    for path in (weights["B"], c):
        assert publish(daemon, path).returncode == 0
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    assert "pruned pre-pack" in daemon.log_text()


def test_signature_change_refused_unless_allowed(daemon: Daemon, weights: dict[str, Path]) -> None:
    done = publish(daemon, weights["bad_sig"])
    assert done.returncode == 1
    assert "output 'y'" in done.stderr and "--allow-signature-change" in done.stderr
    assert current_version(daemon) == 1
    assert len([s for s in daemon.segments() if ".m.v" in s]) == 1
    done = publish(daemon, weights["bad_sig"], "--allow-signature-change")
    assert done.returncode == 0, done.stderr
    y, version = call(daemon, np.ones((1, 64), np.float32))
    assert version == 3 and y.shape == (1, 16)  # v2 was refused; numbers are never reused


def test_version_that_fails_on_a_worker_never_goes_live(
    daemon: Daemon, weights: dict[str, Path]
) -> None:
    x = np.ones((2, 64), np.float32)
    before, _ = call(daemon, x)
    done = publish(daemon, weights["unloadable"])
    assert done.returncode == 1
    assert "was not published" in done.stderr and "NoSuchOperator" in done.stderr
    y, version = call(daemon, x)
    assert version == 1 and y.tobytes() == before.tobytes()
    assert len([s for s in daemon.segments() if ".m.v" in s]) == 1
    assert publish(daemon, weights["B"]).returncode == 0  # and the next publish works
    assert call(daemon, x)[1] == 3


def tunables_of(pid: int) -> list[str]:
    """GLIBC_TUNABLES as a process started with it. glibc (2.36) writes NULs over the ':'s of
    the string it parsed, which /proc/PID/environ shows (the process's own copy is whole), so
    the entries after it that are tunables are part of it."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    prefix = b"GLIBC_TUNABLES="
    for i, entry in enumerate(entries):
        if entry.startswith(prefix):
            parts = [entry[len(prefix):]]
            parts += itertools.takewhile(lambda e: e.startswith(b"glibc."), entries[i + 1:])
            return [t.decode() for part in parts for t in part.split(b":") if t]
    return []


def thp_enabled(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("THP_enabled"))


@pytest.mark.skipif(hugepages.environ_with_tunable({}) is None,
                    reason="needs glibc >= 2.35 and THP in madvise mode")
def test_huge_pages_only_while_a_publish_creates_its_sessions(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    with serving(tmp_path, {"m": weights["A"]}, extra=["--huge-pages"]) as daemon:
        pid = daemon.proc.pid  # the re-executed daemon keeps the pid it was started with
        assert hugepages.TUNABLE in tunables_of(pid)
        everyone = [pid, *daemon.worker_pids(role=None)]
        assert {thp_enabled(p) for p in everyone} == {"0"}
        assert publish(daemon, weights["B"]).returncode == 0
        wait_until(lambda: daemon.log_text().count("m v2 created") >= 3, what="v2's sessions")
        created = [line for line in daemon.log_text().splitlines()
                   if "m v1 created" in line or "m v2 created" in line]
        assert all("huge pages: off" in line for line in created if "m v1" in line)  # boot
        assert all("huge pages: on" in line for line in created if "m v2" in line)  # publish
        assert {thp_enabled(p) for p in everyone} == {"0"}  # and closed again


def test_without_huge_pages_the_daemon_runs_as_started(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    with serving(tmp_path, {"m": weights["A"]}, extra=["--no-huge-pages"]) as daemon:
        with open(f"/proc/{daemon.proc.pid}/environ", "rb") as f:
            assert hugepages.TUNABLE.encode() not in f.read()
        assert thp_enabled(daemon.proc.pid) == thp_enabled(os.getpid())  # as inherited


@pytest.mark.skipif(hugepages.glibc_version() is None, reason="glibc tunables")
@pytest.mark.parametrize("release", [True, False])
def test_workers_that_release_memory_run_without_malloc_thread_caches(
    tmp_path: Path, weights: dict[str, Path], release: bool
) -> None:
    """A freed chunk in a thread's tcache pins heap pages malloc_trim cannot return
    (worker.heap); the daemon re-executes itself with the tunable, huge pages or not, unless
    idle workers keep their memory anyway."""
    flag = "--release-memory" if release else "--no-release-memory"
    with serving(tmp_path, {"m": weights["A"]},
                 extra=["--no-huge-pages", flag, "--stall-timeout", "30"],
                 env={"GLIBC_TUNABLES": "",  # not the runner's own
                      "SHMCACHE_STALL_TIMEOUT": "29"}) as daemon:  # a config warning
        everyone = [daemon.proc.pid, *daemon.worker_pids(role=None)]
        assert len(everyone) >= 3
        assert {heap.STARTUP_TUNABLES[0] in tunables_of(p) for p in everyone} == {release}
        assert hugepages.TUNABLE not in tunables_of(daemon.proc.pid)
        assert thp_enabled(daemon.proc.pid) == thp_enabled(os.getpid())  # left as it was
        assert daemon.log_text().count("SHMCACHE_STALL_TIMEOUT overrides") == 1  # re-exec or not
        assert call(daemon, np.ones((2, 64), np.float32))[1] == 1  # and serves


def test_a_tunable_set_by_the_user_is_kept(tmp_path: Path, weights: dict[str, Path]) -> None:
    mine = "glibc.malloc.tcache_count=3"
    with serving(tmp_path, {"m": weights["A"]}, extra=["--no-huge-pages"],
                 env={"GLIBC_TUNABLES": mine}) as daemon:
        assert tunables_of(daemon.proc.pid) == [mine]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_weight_file_refused_before_workers_see_it(
    daemon: Daemon, weights: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    arrays = {t.name: numpy_helper.to_array(t) + 1 for t in models.mlp(SIZES, seed=5).graph.initializer}
    path = tmp_path / "w.npz"
    np.savez(path, **arrays)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    done = publish(daemon, path)
    assert done.returncode == 1 and "corrupted or truncated" in done.stderr
    assert "WeightsError" in done.stderr  # refused by the builder, before any prepare
    assert current_version(daemon) == 1


def test_weights_by_name_over_the_served_graph(daemon: Daemon, tmp_path: Path,
                                               weights: dict[str, Path]) -> None:
    new = models.mlp(SIZES, seed=6)
    path = tmp_path / "w0.npz"
    np.savez(path, w0=numpy_helper.to_array(new.graph.initializer[0]))  # only one tensor
    done = publish(daemon, path)
    assert done.returncode == 0, done.stderr
    # Expected: model A with w0 replaced.
    mixed = models.mlp(SIZES, seed=1)
    mixed.graph.initializer[0].CopyFrom(new.graph.initializer[0])
    ref = reference(models.save(mixed, tmp_path / "mixed.onnx"))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    y, version = call(daemon, x)
    assert version == 2 and y.tobytes() == ref.run(None, {"x": x})[0].tobytes()


def test_a_file_replaced_while_it_is_published_is_not_what_goes_live(
        tmp_path: Path, weights: dict[str, Path]) -> None:
    """The file is read once: checked, kept and served from that one read. Replaced after it
    was read (here: by a fault hook, at the worst moment), it once went live unchecked, a
    renamed output and all, without --allow-signature-change."""
    given = tmp_path / "given.onnx"
    shutil.copy(weights["B"], given)
    shutil.copy(weights["bad_sig"], tmp_path / "evil.onnx")
    env = {"SHMCACHE_FAULT_REPLACE_AFTER_COPY": str(tmp_path / "evil.onnx")}
    with serving(tmp_path, {"m": weights["A"]}, env=env) as d:
        done = publish(d, given)
        assert done.returncode == 0, done.stderr
        assert_serves(d, 2, weights["B"])
        kept = d.tmp / "state" / "models" / "m" / "v2.onnx"
        assert kept.read_bytes() == weights["B"].read_bytes()
    assert given.read_bytes() == weights["bad_sig"].read_bytes()  # it was replaced


def test_a_served_file_changed_on_disk_is_not_what_a_publish_is_checked_against(
        daemon: Daemon, tmp_path: Path, weights: dict[str, Path]) -> None:
    """Weights by name fill in the rest from the served version. With the configured file
    replaced on disk (normal before a restart), they were filled in from the new file."""
    shutil.copy(weights["B"], weights["A"])
    path = tmp_path / "w0.npz"
    np.savez(path, w0=numpy_helper.to_array(models.mlp(SIZES, seed=6).graph.initializer[0]))
    done = publish(daemon, path)
    assert done.returncode == 1 and "has changed on disk since" in done.stderr, done.stderr
    assert current_version(daemon) == 1


def test_a_manifest_that_cannot_be_written_fails_the_publish_not_the_daemon(
        daemon: Daemon, weights: dict[str, Path]) -> None:
    """A full or failing disk at the commit: the publish (or rollback) fails with the reason,
    the old version keeps serving; the supervisor used to die of the OSError."""
    blocker = daemon.tmp / "state" / "manifest.tmp"
    blocker.mkdir()  # the manifest's temporary file cannot be created
    done = publish(daemon, weights["B"])
    assert done.returncode == 1 and "cannot record m v2" in done.stderr, done.stderr
    assert daemon.proc.poll() is None
    assert_serves(daemon, 1, weights["A"])
    blocker.rmdir()
    assert publish(daemon, weights["B"]).returncode == 0
    blocker.mkdir()
    with pytest.raises(errors.PublishFailed, match="cannot record m v1"):
        daemon.control("rollback", model="m")
    assert daemon.proc.poll() is None
    version = current_version(daemon)
    assert_serves(daemon, version, weights["B"])
    blocker.rmdir()
    daemon.control("rollback", model="m")
    assert_serves(daemon, 1, weights["A"])


def test_half_written_copies_of_killed_publishes_are_swept(
        tmp_path: Path, weights: dict[str, Path]) -> None:
    """A publish killed while its weights were copied left models/m/vN.tmp for good: neither
    a later commit nor a restart removed it (96 MiB in the probe that found it)."""
    copies = tmp_path / "state" / "models" / "m"
    copies.mkdir(parents=True)
    leftovers = [copies / "v7.tmp", copies / "v9.partial.onnx"]
    for file in leftovers:
        file.write_bytes(b"half")
    with serving(tmp_path, {"m": weights["A"]}) as d:
        assert not any(file.exists() for file in leftovers)
        assert "a weight copy a killed publish left half-written" in d.log_text()
        (copies / "v5.partial.onnx").write_bytes(b"half")  # as if killed since
        assert publish(d, weights["B"]).returncode == 0  # its commit sweeps too
        assert not (copies / "v5.partial.onnx").exists()


def test_concurrent_publish_is_refused_clearly(daemon: Daemon, weights: dict[str, Path]) -> None:
    first = publish_in_background(daemon, weights["B"])
    wait_until(lambda: daemon.control("publish_status", model="m")["phase"] != "idle"
               or first.poll() is not None, 60, "first publish under way")
    second = publish(daemon, weights["A"])
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    if "Busy" not in second.stderr:  # the first was already done: then the second ran after it
        assert second.returncode == 0
        pytest.skip("the first publish finished before the second was sent")
    assert second.returncode == 1 and "already" in second.stderr


def test_pinned_versions_and_rollback(daemon: Daemon, weights: dict[str, Path]) -> None:
    x = np.ones((1, 64), np.float32)
    a_out, _ = call(daemon, x)
    assert publish(daemon, weights["B"]).returncode == 0
    # status shows what the workers dispatch to from the flip on, not at their next heartbeat
    assert {w["versions"]["m"] for w in daemon.status()["workers"] if w["role"] == "active"} == {2}
    b_out, version = call(daemon, x)
    assert version == 2 and b_out.tobytes() != a_out.tobytes()
    pinned, version = call(daemon, x, version=1)
    assert version == 1 and pinned.tobytes() == a_out.tobytes()
    with pytest.raises(errors.NotFound):
        call(daemon, x, version=7)
    daemon.control("rollback", model="m")
    assert {w["versions"]["m"] for w in daemon.status()["workers"] if w["role"] == "active"} == {1}
    y, version = call(daemon, x)
    assert version == 1 and y.tobytes() == a_out.tobytes()
    with pytest.raises(errors.NotFound):
        daemon.control("rollback", model="m", to=5)


def test_rollback_goes_to_what_served_before_not_to_what_was_rolled_back_from(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """v2 (B) rolled back to v1 (A) because it was bad, then v3 published: the version kept,
    and where a plain rollback goes, is v1, which served before v3, not the bad v2. So after
    a restart too."""
    x = np.ones((1, 64), np.float32)
    c = models.save(models.mlp(SIZES, seed=3), tmp_path / "c.onnx")
    a_out = reference(weights["A"]).run(None, {"x": x})[0]
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert publish(d, weights["B"]).returncode == 0
        d.control("rollback", model="m")
        assert publish(d, c).stdout.strip() == "3"
        assert kept_versions(d) == [1]
        assert d.control("rollback", model="m")["version"] == 1
        y, version = call(d, x)
        assert version == 1 and y.tobytes() == a_out.tobytes()
        d.control("rollback", model="m", to=3)
    finally:
        assert d.stop() == 0
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        wait_until(lambda: kept_versions(d) == [1], 60, "v1 loaded again")
        assert d.control("rollback", model="m")["version"] == 1
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_publishing_needs_the_control_socket(daemon: Daemon, weights: dict[str, Path]) -> None:
    with shmcache.Client(str(daemon.socket)) as c:
        with pytest.raises(errors.UnsupportedOp):
            c.request("publish", model="m", path=str(weights["B"]))
    assert current_version(daemon) == 1


def test_committed_version_survives_clean_stop_and_crash(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    b_out = reference(weights["B"]).run(None, {"x": x})[0]
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1).wait_ready()
    assert publish(d, weights["B"]).returncode == 0
    assert d.stop() == 0
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1).wait_ready()  # clean restart
    y, version = call(d, x)
    assert version == 2 and y.tobytes() == b_out.tobytes()
    d.signal(signal.SIGKILL)  # crash: the sealed segment stays behind
    d.wait_exit(10)
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1).wait_ready()
    try:
        assert "re-attached intact segment" in d.log_text()
        y, version = call(d, x)
        assert version == 2 and y.tobytes() == b_out.tobytes()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_after_a_crash_a_changed_model_file_is_built_not_the_old_segment(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """v1 of A's segment survives a crash intact; the daemon restarted on B (never published)
    must serve B, under a number of its own: v1 named A's weights."""
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    d.signal(signal.SIGKILL)
    d.wait_exit(10)
    d = Daemon(tmp_path, {"m": weights["B"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert "is not what v1 served" in d.log_text()
        y, version = call(d, x)
        assert version == 2
        assert y.tobytes() == reference(weights["B"]).run(None, {"x": x})[0].tobytes()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_configured_file_replaced_before_any_publish_gets_a_new_number(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    x = np.ones((1, 64), np.float32)
    served = tmp_path / "served.onnx"
    for content, expected in ((weights["A"], 1), (weights["B"], 2), (weights["A"], 3),
                              (weights["A"], 3)):
        served.write_bytes(content.read_bytes())
        d = Daemon(tmp_path, {"m": served}, workers=1, extra=["--standby", "0"]).wait_ready()
        try:
            y, version = call(d, x)
            assert version == expected
            assert y.tobytes() == reference(content).run(None, {"x": x})[0].tobytes()
        finally:
            assert d.stop() == 0


def test_a_missing_committed_copy_stops_the_start_and_the_fix_keeps_numbers_unique(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    published_and_stopped(tmp_path, weights)
    (tmp_path / "state" / "models" / "m" / "v2.onnx").unlink()
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"])
    assert d.wait_exit(60) == EXIT_STARTUP and "the copy of committed v2, is missing" in d.log_text()
    manifest = tmp_path / "state" / "manifest.json"  # the fix the message gives
    data = json.loads(manifest.read_text())
    del data["models"]["m"]["version"], data["models"]["m"]["file"]
    manifest.write_text(json.dumps(data))
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert current_version(d) == 1  # the configured file, still what v1 served
        done = publish(d, weights["B"])
        assert done.returncode == 0 and done.stdout.strip() == "3"
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_hand_edited_manifest_does_not_crash_the_daemon(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "manifest.json").write_text(json.dumps({"layout": 1, "models": {
        "m": {"kept": {"99999999999999999999": "models/m/v9.onnx", "x": 3},
              "digests": {"1": "abcd", "2": ["no"]}, "issued": "7"},
        "other": {"kept": ["a"], "file": 5}}}))
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert current_version(d) == 1
        done = publish(d, weights["B"])
        assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr
        d.control("rollback", model="m")
        assert current_version(d) == 1
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log_text()
    assert d.segments() == []


def test_a_restart_never_reissues_a_version_number(tmp_path: Path, weights: dict[str, Path]) -> None:
    """v2 published then rolled back; restarted with --keep 0 only v1 is loaded, and the next
    publish is v3. Reissuing 2 would make one number name two different weights."""
    x = np.ones((1, 64), np.float32)
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert publish(d, weights["B"]).returncode == 0
        d.control("rollback", model="m")
        assert current_version(d) == 1
    finally:
        assert d.stop() == 0
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1,
               extra=["--standby", "0", "--keep", "0"]).wait_ready()
    try:
        assert current_version(d) == 1 and kept_versions(d) == []
        done = publish(d, weights["B"])
        assert done.returncode == 0 and "3" in done.stdout
        _, version = call(d, x)
        assert version == 3
        # v2's copy, kept before the restart and loaded by no one since, is gone
        copies = sorted(p.name for p in (tmp_path / "state" / "models" / "m").iterdir())
        assert copies == ["v3.onnx"]
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def kept_versions(d: Daemon) -> list[int]:
    return next(m["kept"] for m in d.status()["models"] if m["name"] == "m")


def test_kept_versions_survive_a_restart_for_rollback(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """A rollback is most wanted right after a bad publish crashed or restarted the daemon:
    the kept version comes back too. After a clean stop it is rebuilt in the background
    (serving starts without waiting for it); after a crash its intact segment is re-attached."""
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    a_out = reference(weights["A"]).run(None, {"x": x})[0]
    b_out = reference(weights["B"]).run(None, {"x": x})[0]
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2, extra=["--standby", "0"]).wait_ready()
    try:
        assert publish(d, weights["B"]).returncode == 0
    finally:
        assert d.stop() == 0
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2, extra=["--standby", "0"]).wait_ready()
    assert current_version(d) == 2
    wait_until(lambda: kept_versions(d) == [1], 60, "v1 loaded again")
    assert "kept version m v1 loaded again" in d.log_text()
    table = subprocess.run([sys.executable, "-m", "shmcache.cli", "status", "--socket",
                            str(d.socket)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    header, row = [line for line in table.splitlines() if line.startswith(("model", "m "))]
    assert "kept (rollback)" in header and row.split()[:3] == ["m", "2", "v1"]
    d.control("rollback", model="m")
    for _ in range(6):  # both workers serve it
        y, version = call(d, x)
        assert version == 1 and y.tobytes() == a_out.tobytes()
    d.signal(signal.SIGKILL)
    d.wait_exit(10)
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2, extra=["--standby", "0"]).wait_ready()
    try:
        assert current_version(d) == 1 and kept_versions(d) == [2]  # no rebuild needed
        assert "(kept) (digest verified)" in d.log_text()
        d.control("rollback", model="m", to=2)
        for _ in range(6):
            y, version = call(d, x)
            assert version == 2 and y.tobytes() == b_out.tobytes()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_relative_model_path_survives_restarts(tmp_path: Path, weights: dict[str, Path]) -> None:
    """``--model m=models/a.onnx``, given relative to the working directory: the manifest used
    to record it as given and read it back against the state directory, where
    ``models/...`` is the daemon's own copies. A restart then refused to start (the
    configured file committed, after a rollback) or silently dropped the kept version."""
    (tmp_path / "models").mkdir()
    weights["A"].rename(tmp_path / "models" / "a.onnx")
    weights["A"] = tmp_path / "models" / "a.onnx"

    def start() -> Daemon:
        return Daemon(tmp_path, {"m": Path("models/a.onnx")}, workers=1,
                      extra=["--standby", "0"], cwd=tmp_path).wait_ready()

    d = start()
    try:
        assert publish(d, weights["B"]).returncode == 0
    finally:
        assert d.stop() == 0
    d = start()
    try:
        wait_until(lambda: kept_versions(d) == [1], 60, "kept v1 loaded again")
        d.control("rollback", model="m")
        assert_serves(d, 1, weights["A"])
    finally:
        assert d.stop() == 0
    d = start()  # v1, the configured file, is the committed version now
    try:
        assert_serves(d, 1, weights["A"])
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def published_and_stopped(tmp_path: Path, weights: dict[str, Path]) -> None:
    """A daemon that served A as v1, published B as v2 (keeping v1), and stopped cleanly."""
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"]).wait_ready()
    try:
        assert publish(d, weights["B"]).returncode == 0
    finally:
        assert d.stop() == 0


def restoring(tmp_path: Path, weights: dict[str, Path], prepare_delay: str,
              workers: int = 1) -> Daemon:
    """published_and_stopped, restarted: serving v2, loading kept v1 again (each prepare
    slowed down by ``prepare_delay`` seconds)."""
    published_and_stopped(tmp_path, weights)
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=workers, extra=["--standby", "0"],
               env={"SHMCACHE_FAULT_PREPARE_DELAY": prepare_delay}).wait_ready()
    try:
        wait_until(lambda: d.control("publish_status", model="m").get("kind") == "restore",
                   30, "restore started")
    except BaseException:
        d.stop()
        raise
    return d


def test_a_publish_does_not_wait_for_a_kept_version_to_load_again(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """Restarted with a kept version to load again (slowed down here), a publish goes first:
    the restore is abandoned, the publish flips, and the version kept is the one before it."""
    d = restoring(tmp_path, weights, prepare_delay="3")
    try:
        with pytest.raises(errors.Busy, match="still loading after the restart"):
            d.control("rollback", model="m")
        done = publish(d, weights["A"])
        assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr
        assert "a publish came first" in d.log_text()
        assert current_version(d) == 3 and kept_versions(d) == [2]
        assert d.control("publish_status", model="m")["phase"] == "idle"
        assert len([s for s in d.segments() if ".m.v" in s]) == 2
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_changed_file_never_serves_under_an_old_version_number(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """A version's weights are those it was loaded with, or none: the configured model file
    replaced after v1 was rolled back to serves as a new number; a kept copy that no longer
    matches its recorded digest is not restored; a damaged committed copy stops the start."""
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    served = tmp_path / "served.onnx"
    served.write_bytes(weights["A"].read_bytes())
    b_out = reference(weights["B"]).run(None, {"x": x})[0]
    flags = ["--standby", "0"]
    d = Daemon(tmp_path, {"m": served}, workers=1, extra=flags).wait_ready()
    try:
        assert publish(d, weights["B"]).returncode == 0
        d.control("rollback", model="m")  # v1 (the configured file) committed, v2 kept
    finally:
        assert d.stop() == 0
    c = models.save(models.mlp(SIZES, seed=3), tmp_path / "c.onnx")
    served.write_bytes(c.read_bytes())  # a deploy replaces the configured file
    d = Daemon(tmp_path, {"m": served}, workers=1, extra=flags).wait_ready()
    try:
        y, version = call(d, x)
        assert version == 3 and y.tobytes() == reference(c).run(None, {"x": x})[0].tobytes()
        assert "is not what v1 served (replaced, or another path configured); serving it " \
            "as v3" in d.log_text()
        wait_until(lambda: kept_versions(d) == [2], 60, "v2 loaded again")
        d.control("rollback", model="m")
        y, version = call(d, x)
        assert version == 2 and y.tobytes() == b_out.tobytes()
        d.control("rollback", model="m", to=3)
    finally:
        assert d.stop() == 0
    copy = tmp_path / "state" / "models" / "m" / "v2.onnx"
    damaged = bytearray(copy.read_bytes())
    damaged[-100] ^= 0x01  # one bit of one weight
    copy.write_bytes(bytes(damaged))
    d = Daemon(tmp_path, {"m": served}, workers=1, extra=flags).wait_ready()
    try:
        assert current_version(d) == 3  # the same contents keep their number
        wait_until(lambda: "could not be loaded again" in d.log_text(), 60, "v2 refused")
        assert "changed since m v2 was loaded" in d.log_text() and kept_versions(d) == []
        with pytest.raises(errors.NotFound):
            d.control("rollback", model="m", to=2)
    finally:
        assert d.stop() == 0
    assert d.segments() == []


@pytest.mark.parametrize("damage", ["bit-flip", "truncated"])
def test_a_damaged_committed_copy_stops_the_start_with_the_fix(
    tmp_path: Path, weights: dict[str, Path], damage: str
) -> None:
    """Either damage is named as such, with the way out (a truncated copy used to be only
    "not an ONNX model")."""
    published_and_stopped(tmp_path, weights)
    copy = tmp_path / "state" / "models" / "m" / "v2.onnx"
    damaged = bytearray(copy.read_bytes())
    if damage == "bit-flip":
        damaged[-100] ^= 0x01
    else:
        del damaged[len(damaged) // 2:]
    copy.write_bytes(bytes(damaged))
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"])
    assert d.wait_exit(60) == EXIT_STARTUP
    assert "the committed copy" in d.log_text() and "is damaged" in d.log_text()
    assert 'delete "version" and "file" (not "issued")' in d.log_text()
    assert d.segments() == []


def test_a_failed_publish_lets_the_restore_resume(tmp_path: Path, weights: dict[str, Path]) -> None:
    d = restoring(tmp_path, weights, prepare_delay="2")
    try:
        assert publish(d, weights["bad_sig"]).returncode != 0
        wait_until(lambda: kept_versions(d) == [1], 60, "restore resumed and done")
        d.control("rollback", model="m")
        assert_serves(d, 1, weights["A"])
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_request_pinned_to_a_kept_version_loading_again_is_told_to_retry(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """Right after a restart the kept v1 is still loading: a request pinned to it gets
    not_ready, which the client retries until v1 is back, instead of not_found (gone)."""
    x = np.ones((2, 64), np.float32)
    d = restoring(tmp_path, weights, prepare_delay="4")
    try:
        with shmcache.Client(str(d.socket), timeout=0.5) as impatient:
            with pytest.raises(errors.NotReady, match="loaded again after a restart"):
                impatient.run_with_version("m", None, {"x": x}, version=1)
            with pytest.raises(errors.NotFound):
                impatient.run_with_version("m", None, {"x": x}, version=7)
        assert kept_versions(d) == []
        y, version = call(d, x, version=1)  # waits for the restore
        assert version == 1
        assert kept_versions(d) == [1]
        assert y.tobytes() == reference(weights["A"]).run(None, {"x": x})[0].tobytes()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_version_is_not_served_pinned_before_it_goes_live(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """One worker has prepared v2, the other not yet (held stopped): v2 is not live, and a
    request pinned to it must not be served (the publish may still fail)."""
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2, extra=["--standby", "0"],
               env={"SHMCACHE_FAULT_PREPARE_DELAY": "2"}).wait_ready()
    held = None
    try:
        proc = publish_while_preparing(d, weights["B"])
        held = d.worker_pids()[1]
        os.kill(held, signal.SIGSTOP)
        wait_until(lambda: d.control("publish_status", model="m")["prepared"] == 1, 30,
                   "one worker prepared")
        x = np.ones((1, 64), np.float32)
        # not_ready is retried until the client's timeout: a pinned canary waits for the flip
        with shmcache.Client(str(d.socket), timeout=1.0) as impatient:
            with pytest.raises(errors.NotReady, match="not live yet"):
                impatient.run_with_version("m", None, {"x": x}, version=2)
        os.kill(held, signal.SIGCONT)
        held = None
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        y, version = call(d, x, version=2)
        assert version == 2
        assert y.tobytes() == reference(weights["B"]).run(None, {"x": x})[0].tobytes()
        d.control("rollback", model="m")
        for _ in range(4):  # still live after the flip went away from it
            assert call(d, x, version=2)[1] == 2
    finally:
        if held is not None:
            os.kill(held, signal.SIGCONT)
        assert d.stop() == 0
    assert d.segments() == []


def test_a_publish_sent_while_the_daemon_builds_waits_for_it_to_serve(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """not_ready (retried by the client), not unknown_model: the model is there, not yet
    serving."""
    big = models.save(models.mlp((64, 4096, 4096, 32), seed=1), tmp_path / "big.onnx")
    d = Daemon(tmp_path, {"m": big}, workers=1, extra=["--standby", "0"])
    try:
        wait_until(lambda: (d.health() or {}).get("phase") == "building", 60, "building",
                   0.005)
        with shmcache.Client(str(control_socket_path(d.socket)), timeout=120) as control:
            reply = control.request("publish", model="m", path=str(big),
                                    allow_signature_change=True)
        assert reply["version"] == 2 and reply["previous"] == 1
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_worker_started_during_a_restore_maps_only_live_versions(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """The replacement of a worker that died while kept v1 loads again boots with the live
    versions only, and prepares v1 once ready, when asked: a publish may still drop it (its
    boot then failed on the vanished segment)."""
    d = restoring(tmp_path, weights, prepare_delay="3", workers=2)
    try:
        wait_until(lambda: d.control("publish_status", model="m")["phase"] == "preparing",
                   30, "v1's segment built")
        dead, other = d.worker_pids()
        os.kill(dead, signal.SIGKILL)
        (replacement,) = wait_until(lambda: [p for p in d.worker_pids() if p not in
                                             (dead, other)], 60, "replacement ready")
        wait_until(lambda: kept_versions(d) == [1], 60, "v1 loaded again")
        log = d.log_text().splitlines()
        ready = log.index(next(line for line in log
                               if f"active worker {replacement} ready" in line))
        v1 = log.index(next(line for line in log
                            if f"worker[{replacement}]: session for m v1" in line))
        assert v1 > ready
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_worker_retired_during_a_prepare_does_not_fail_the_publish(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """SIGTTOU while workers prepare: the worker the daemon stops is no veto."""
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2, extra=["--standby", "0"],
               env={"SHMCACHE_FAULT_PREPARE_DELAY": "3"}).wait_ready()
    try:
        proc = publish_while_preparing(d, weights["B"])
        d.signal(signal.SIGTTOU)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        wait_until(lambda: len(d.worker_pids()) == 1, 30, "one worker left")
        assert_serves(d, 2, weights["B"])
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def thread_nice_values(pid: int) -> dict[int, int]:
    """Thread id -> nice value, for every thread of ``pid`` (field 19 of its stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:
            pass  # exited meanwhile
    return out


def test_inference_yields_to_a_prepare_and_fresh_threads_serve_after_it(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """While a publish's prepare runs late, the worker's inference thread runs niced (the
    flip waits for the prepare); calls are still answered, and afterwards they run on a fresh
    thread at the worker's own priority (a nice value cannot be lowered again)."""
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1,
               extra=["--standby", "0", "--threads", "1"],
               env={"SHMCACHE_FAULT_PREPARE_DELAY": "3"}).wait_ready()
    try:
        # Big enough to run on the inference thread: a one-row call of this model runs in
        # microseconds, so the worker runs it on its loop thread (worker.server.INLINE_BELOW)
        # and, on a fast host, never starts the inference thread this test watches.
        x = np.ones((4096, 64), np.float32)
        assert call(d, x)[1] == 1  # the inference thread exists
        (pid,) = d.worker_pids()
        before = thread_nice_values(pid)
        base = before[pid]  # the worker's own (the test runner may itself run niced)
        assert set(before.values()) == {base}
        proc = publish_while_preparing(d, weights["B"])  # held back 3 s: late
        yielding = min(19, base + PREPARE_PRECEDENCE)
        wait_until(lambda: yielding in thread_nice_values(pid).values(), 2.5, "yielding")
        during = thread_nice_values(pid)
        niced = {tid for tid, nice in during.items() if nice == yielding}
        assert len(niced) == 1 and niced <= set(before)  # the inference thread, nothing else
        assert set(during.values()) == {base, yielding}
        assert call(d, x)[1] == 1  # still served meanwhile, on the old version
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert_serves(d, 2, weights["B"])
        wait_until(lambda: set(thread_nice_values(pid).values()) == {base}, 10,
                   "the niced thread retired")
        assert not niced & set(thread_nice_values(pid))
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_killed_publisher_leaves_the_old_version_serving(
    daemon: Daemon, weights: dict[str, Path], tmp_path: Path
) -> None:
    big = models.save(models.mlp((64, 2048, 2048, 32), seed=9), tmp_path / "big.onnx")
    proc = publish_in_background(daemon, big, "--allow-signature-change")
    wait_until(lambda: daemon.control("publish_status", model="m")["phase"] == "building",
               60, "publish building")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaps it and closes its pipes
    wait_until(lambda: daemon.control("publish_status", model="m")["phase"] == "idle", 60,
               "publish abandoned")
    assert "publisher disconnected" in daemon.log_text()
    assert current_version(daemon) == 1 and call(daemon, np.ones((1, 64), np.float32))[1] == 1
    wait_until(lambda: len([s for s in daemon.segments() if ".m.v" in s]) == 1, 30,
               "half-written segment gone")
    assert publish(daemon, weights["B"]).returncode == 0


def dead_segment_mappings(pid: int) -> list[str]:
    """/dev/shm files ``pid`` still maps after they were unlinked."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "/dev/shm/" in line and "(deleted)" in line]


def test_a_version_abandoned_while_workers_prepare_it_is_not_kept(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """The publisher dies while the worker creates its session: the drop arrives before the
    session is done, and the finished session must be freed, not installed (it would map the
    unlinked segment, its pages never returned, for the worker's life)."""
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=1, extra=["--standby", "0"],
               env={"SHMCACHE_FAULT_PREPARE_DELAY": "3"}).wait_ready()
    try:
        proc = publish_while_preparing(d, weights["B"])
        (worker,) = d.worker_pids()
        wait_until(lambda: dead_segment_mappings(worker) == [], 1, "nothing unlinked mapped yet")
        proc.kill()
        proc.communicate()
        wait_until(lambda: "publisher disconnected" in d.log_text(), 30, "publish abandoned")
        time.sleep(4)  # the prepare's session is done by now
        wait_until(lambda: dead_segment_mappings(worker) == [], 10, "abandoned session freed")
        assert call(d, np.ones((1, 64), np.float32))[1] == 1
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_worker_killed_during_prepare_aborts_the_publish(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    d = Daemon(tmp_path, {"m": weights["A"]}, workers=2,
               env={"SHMCACHE_FAULT_PREPARE_DELAY": "3"}).wait_ready()
    try:
        proc = publish_while_preparing(d, weights["B"])
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "died while preparing" in err
        wait_until(lambda: len(d.worker_pids()) == 2, 60, "worker replaced")
        assert call(d, np.ones((1, 64), np.float32))[1] == 1
        assert len([s for s in d.segments() if ".m.v" in s]) == 1
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_standby_catches_up_after_a_flip_and_takes_over_on_the_new_version(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """The default warm spare is left out of the prepare (the flip does not wait for it), then
    prepares the new version; a worker dying afterwards is replaced by it, serving the new
    version only."""
    with serving(tmp_path, {"m": weights["A"]}) as d:  # default: one standby
        (spare,) = wait_until(lambda: d.worker_pids(role="standby"), 60, "standby ready")
        assert publish(d, weights["B"]).returncode == 0
        wait_until(lambda: f"standby worker {spare} prepared m v2" in d.log_text(), 60,
                   "standby caught up")
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        wait_until(lambda: spare in d.worker_pids(), 10, "standby activated")
        # status says what the promoted spare serves: the version it caught up to
        assert {w["versions"]["m"] for w in d.status()["workers"] if w["pid"] == spare} == {2}
        x = np.ones((1, 64), np.float32)
        expected = reference(weights["B"]).run(None, {"x": x})[0]
        for _ in range(20):  # whichever active worker answers, the former spare or not
            y, version = call(d, x)
            assert version == 2 and y.tobytes() == expected.tobytes()
        assert f"activated standby worker {spare}" in d.log_text()


def test_no_prepack_serves_the_optimized_graph_exactly_and_takes_weights_by_name(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    """--no-prepack segments carry ORT's optimized graph (no pre-packs): outputs identical to
    an in-process session over the original file with pre-packing off, and a weights-only
    publish applies to the original model, not to the optimized graph's renamed tensors."""
    from shmcache.segment import Segment

    conv = models.save(models.convnet(seed=9), tmp_path / "conv.onnx")

    def plain(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), SessionSettings(intra_op_threads=1).options(
            prepacked=False), providers=["CPUExecutionProvider"])

    with serving(tmp_path, {"m": weights["A"], "conv": conv}, extra=["--no-prepack"]) as d:
        for name in ("m", "conv"):
            seg = Segment.attach(next(s for s in d.segments() if f".{name}.v1." in s))
            try:
                assert seg.header.optimized and not seg.header.prepacked
            finally:
                seg.close()
        img = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
        with shmcache.Client(str(d.socket)) as c:
            (logits,) = c.run("conv", None, {"img": img})
        assert logits.tobytes() == plain(conv).run(None, {"img": img})[0].tobytes()

        new = models.mlp(SIZES, seed=6)
        npz = tmp_path / "w0.npz"
        np.savez(npz, w0=numpy_helper.to_array(new.graph.initializer[0]))
        done = publish(d, npz)
        assert done.returncode == 0, done.stderr
        mixed = models.mlp(SIZES, seed=1)
        mixed.graph.initializer[0].CopyFrom(new.graph.initializer[0])
        x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
        y, version = call(d, x)
        expected = plain(models.save(mixed, tmp_path / "mixed.onnx")).run(None, {"x": x})[0]
        assert version == 2 and y.tobytes() == expected.tobytes()
