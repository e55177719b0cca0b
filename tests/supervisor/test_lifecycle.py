"""The daemon under real signals and real load: replacement, stop, reload, scaling, crashes."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from onnx import helper

import shmcache
from shmcache import errors, protocol, registry
from shmcache.cli import format_status
from shmcache.paths import control_socket_path
from supervisor.arbiter import EXIT_STARTUP, MAX_EARLY_PEERS
from tests import models
from tests.supervisor.daemon import Daemon, serving, wait_until
from worker.runtime import SessionSettings


@pytest.fixture
def model_paths(tmp_path: Path) -> dict[str, Path]:
    return {"mlp": models.save(models.mlp((64, 256, 32), seed=8), tmp_path / "mlp.onnx"),
            "slow": models.save(models.slow(), tmp_path / "slow.onnx")}


@pytest.fixture
def daemon(tmp_path: Path, model_paths: dict[str, Path]) -> Iterator[Daemon]:
    with serving(tmp_path, model_paths) as d:
        yield d


class Load:
    """Client threads calling continuously; every outcome is recorded and checked."""

    def __init__(self, daemon: Daemon, path: Path, threads: int = 4) -> None:
        self.socket = str(daemon.socket)
        self.ref = ort.InferenceSession(str(path), SessionSettings(intra_op_threads=1).options(),
                                        providers=["CPUExecutionProvider"])
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(threads)]

    def loop(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with shmcache.Client(self.socket, timeout=60) as client:
            while not self.stop.is_set():
                feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
                try:
                    (y,) = client.run("mlp", None, feed)
                    assert y.tobytes() == self.ref.run(None, feed)[0].tobytes()
                    with self.lock:
                        self.ok += 1
                except BaseException as exc:  # noqa: BLE001 - recorded, asserted by the test
                    with self.lock:
                        self.failures.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_until(lambda: self.ok >= 20 or self.failures, 60, "load running")
        return self

    def progress(self, more: int) -> None:
        target = self.ok + more
        wait_until(lambda: self.ok >= target or self.failures, 60, f"{more} more calls")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_each_new_connection_goes_to_the_least_connected_worker(daemon: Daemon) -> None:
    """A connection stays with the worker that accepted it, so who accepts decides the load:
    six clients of two workers must end up three and three, not to whoever woke first."""
    workers = set(daemon.worker_pids())
    assert len(workers) == 2
    clients = [shmcache.Client(str(daemon.socket)) for _ in range(6)]
    try:
        pids = [c.ping()["pid"] for c in clients]  # one after another, each one answered
        assert set(pids) == workers
        # within one of even: a worker that wakes more than ACCEPT_MAX_DELAY late on a busy
        # host lets the other take one more (CI saw 4 and 2 once, before the re-check)
        assert sorted(Counter(pids).values()) in ([3, 3], [2, 4]), pids
    finally:
        for c in clients:
            c.close()


def connections_by_worker(daemon: Daemon) -> list[int]:
    """What each active worker says it holds (status asks them afresh)."""
    return sorted(w["connections"] for w in daemon.status()["workers"] if w["role"] == "active")


def test_new_connections_are_not_held_back_by_the_ones_already_open(daemon: Daemon) -> None:
    """Twenty idle connections open, ten per worker: a new one is still accepted at once by
    whichever worker holds fewest (it waited 50 ms once each worker held five), and the load
    stays even.

    Even means within one connection of 10/10 (and of 12/12 below), not exactly: a worker counts
    a connection until its loop has read the close, and one that is late to wake (CI's two
    cores, busy) lets the other take a connection after ACCEPT_STEP. Whoever-wakes-first, the
    behaviour this replaced, put 3 of 3 on one worker in half the runs of benchmarks/swap.py."""
    held = [shmcache.Client(str(daemon.socket)) for _ in range(20)]
    try:
        pids = [c.ping()["pid"] for c in held]
        assert sorted(Counter(pids).values()) in ([10, 10], [9, 11]), Counter(pids)
        assert connections_by_worker(daemon) == sorted(Counter(pids).values())
        took = []
        for _ in range(20):
            started = time.perf_counter()
            with shmcache.Client(str(daemon.socket)) as c:
                c.ping()
            took.append(time.perf_counter() - started)
        took.sort()
        assert took[len(took) // 2] < 0.010, [f"{t * 1e3:.1f} ms" for t in took]
        settled = sorted(Counter(pids).values())  # once the workers have read those closes
        wait_until(lambda: connections_by_worker(daemon) == settled, 10, "closes noticed")
        more = [shmcache.Client(str(daemon.socket)) for _ in range(4)]
        try:
            pids += [c.ping()["pid"] for c in more]
        finally:
            for c in more:
                c.close()
        assert sorted(Counter(pids).values()) in ([12, 12], [11, 13]), Counter(pids)
    finally:
        for c in held:
            c.close()


def test_killed_worker_is_replaced_without_failing_a_call(
    daemon: Daemon, model_paths: dict[str, Path]
) -> None:
    with Load(daemon, model_paths["mlp"]) as load:
        for _ in range(3):
            victim = daemon.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in daemon.worker_pids(None) and
                       len(daemon.worker_pids()) == 2, 60, "replacement ready")
            load.progress(30)
    assert load.failures == []
    assert daemon.status()["restarts"] == 3
    assert "replacing it" in daemon.log_text()


def test_replacement_maps_the_existing_segment_and_never_rereads_the_model(
    daemon: Daemon, model_paths: dict[str, Path]
) -> None:
    before = {m["name"]: m["segment"] for m in daemon.status()["models"]}
    for path in model_paths.values():
        path.unlink()  # a replacement that re-read the file would fail to boot
    victim = daemon.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in daemon.worker_pids(None) and
               len(daemon.worker_pids()) == 2, 60, "replacement ready")
    new = next(p for p in daemon.worker_pids() if p != victim)
    maps = Path(f"/proc/{new}/maps").read_text()
    assert all(seg in maps for seg in before.values())
    with shmcache.Client(str(daemon.socket)) as c:
        assert c.run("mlp", None, {"x": np.zeros((1, 64), np.float32)})[0].shape == (1, 32)


def test_term_under_load_answers_every_request_already_read(
    tmp_path: Path, model_paths: dict[str, Path]
) -> None:
    d = Daemon(tmp_path, model_paths, workers=1).wait_ready()
    feed = {"x": np.random.default_rng(0).standard_normal((1024, 768)).astype(np.float32)}

    async def main() -> list[object]:
        async with shmcache.AsyncClient(str(d.socket), timeout=120) as client:
            calls = [asyncio.ensure_future(client.run("slow", None, feed)) for _ in range(12)]
            # Wait until the worker has read all 12 and most are still in flight, then stop it.
            def all_read() -> dict | None:
                w = d.status()["workers"][0]
                return w if w["inflight"] + w["served"] == 12 else None

            w = await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(all_read, 60, "12 read"))
            assert w["inflight"] >= 4, "too fast to test: raise the batch"
            d.signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, list) for r in results), results
    assert d.wait_exit(60) == 0
    assert d.segments() == [] and not d.socket.exists()


def test_hup_replaces_every_worker_without_a_failed_call(
    daemon: Daemon, model_paths: dict[str, Path]
) -> None:
    """Every worker replaced under load, each new one ready before an old one stops: the
    ready count never dips below the target."""
    old = set(daemon.worker_pids())
    ready_counts: list[int] = []

    def replaced() -> bool:
        ready = daemon.worker_pids()
        ready_counts.append(len(ready))
        return len(set(ready) - old) == 2 and len(daemon.worker_pids(None)) == 2

    with Load(daemon, model_paths["mlp"]) as load:
        daemon.signal(signal.SIGHUP)
        wait_until(replaced, 120, "all workers replaced", interval=0.02)
        load.progress(50)
    assert load.failures == []
    assert "reload complete" in daemon.log_text()
    assert not any(running(pid) for pid in old)
    assert min(ready_counts) == 2, ready_counts


def test_ttin_ttou_change_the_worker_count(daemon: Daemon) -> None:
    daemon.signal(signal.SIGTTIN)
    wait_until(lambda: len(daemon.worker_pids()) == 3, 60, "3 workers")
    # Standard signals do not queue: a second TTOU sent before the first is handled may merge.
    daemon.signal(signal.SIGTTOU)
    wait_until(lambda: daemon.status()["target_workers"] == 2, 60, "target 2")
    daemon.signal(signal.SIGTTOU)
    wait_until(lambda: len(daemon.worker_pids(None)) == 1, 60, "1 worker")
    daemon.signal(signal.SIGTTOU)  # never below one
    time.sleep(0.5)  # give a wrong reaction the chance to show
    assert len(daemon.worker_pids(None)) == 1
    assert daemon.status()["target_workers"] == 1


def test_workers_ignore_the_supervisors_signals(daemon: Daemon) -> None:
    """HUP, TTIN, TTOU and INT are the supervisor's; sent to the whole group (a terminal's
    hangup, `systemctl kill -s HUP`) a HUP killed every worker and TTIN/TTOU stopped them."""
    workers = sorted(daemon.worker_pids())
    for pid in workers:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGINT):
            os.kill(pid, sig)
    time.sleep(0.5)
    assert all(psutil.Process(pid).status() != psutil.STATUS_STOPPED for pid in workers)
    assert sorted(daemon.worker_pids()) == workers and daemon.status()["restarts"] == 0
    answered = set()
    clients = [shmcache.Client(str(daemon.socket)) for _ in range(4)]
    try:
        answered = {c.ping()["pid"] for c in clients}
    finally:
        for c in clients:
            c.close()
    assert answered == set(workers)


def test_sigkilled_supervisor_takes_workers_along_and_next_start_sweeps(
    tmp_path: Path, model_paths: dict[str, Path]
) -> None:
    d = Daemon(tmp_path, model_paths, workers=2).wait_ready()
    workers = d.worker_pids()
    segments = d.segments()
    weights = sorted(s for s in segments if "._state." not in s and "._board." not in s)
    assert len(weights) == 2 and len(segments) == 4
    try:
        d.signal(signal.SIGKILL)
        d.wait_exit(10)
        start = time.monotonic()
        wait_until(lambda: not any(running(p) for p in workers), 5, "workers gone")
        assert time.monotonic() - start < 1.0
        assert all((Path("/dev/shm") / s).exists() for s in segments)  # orphans, for now
        # Damage one weight segment: the restart must rebuild it, and re-attach the intact one.
        damaged, intact = weights
        with open(Path("/dev/shm") / damaged, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"garbage")
        d2 = Daemon(tmp_path, model_paths, workers=1).wait_ready()
        try:
            log = d2.log_text()
            assert f"re-attached intact segment {intact}" in log
            assert f"swept orphaned segment {damaged}" in log
            assert not (Path("/dev/shm") / damaged).exists()
            left = [s for s in segments if (Path("/dev/shm") / s).exists()]
            assert left == [intact]  # the old version table was swept too
            with shmcache.Client(str(d2.socket)) as c:
                assert c.run("mlp", None, {"x": np.zeros((1, 64), np.float32)})[0].shape == (1, 32)
        finally:
            assert d2.stop() == 0
        assert d2.segments() == []
    finally:
        registry.sweep_orphans(d.instance)


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_socket_modes(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert stat.S_IMODE(Path(f"{daemon.socket}.ctl").stat().st_mode) == 0o600
    for seg in daemon.segments():
        assert stat.S_IMODE((Path("/dev/shm") / seg).stat().st_mode) == 0o600
    # the state directory's copies and caches too (they were 0644 outside the unit's UMask)
    written = [p for p in (daemon.tmp / "state").rglob("*")]
    assert any(p.is_file() for p in written)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))


def test_status_reports_workers_models_and_memory(daemon: Daemon) -> None:
    with shmcache.Client(str(daemon.socket)) as c:
        for _ in range(5):
            c.run("mlp", None, {"x": np.zeros((1, 64), np.float32)})
        status = daemon.status()
    active = [w for w in status["workers"] if w["role"] == "active"]
    assert status["ready"] and len(active) == 2
    assert sum(w["served"] for w in active) >= 5
    assert sorted(w["connections"] for w in active) == [0, 1]  # the client above
    header, *rows = format_status(status).split("\n\n")[1].splitlines()
    column = header.split().index("clients")
    assert sorted(row.split()[column] for row in rows) == sorted(  # the standby's row too
        str(w["connections"]) for w in status["workers"])
    for w in active:
        assert w["versions"] == {"mlp": 1, "slow": 1}
        assert w["uss"] > 0 and w["pss"] >= w["uss"] and w["shared"] > 0
    sizes = {m["name"]: m["size"] for m in status["models"]}
    assert sizes["slow"] > 6 * 768 * 768 * 4


def test_refuses_to_steal_a_live_daemons_socket(daemon: Daemon, tmp_path: Path,
                                                model_paths: dict[str, Path]) -> None:
    second = Daemon(tmp_path, model_paths)
    assert second.wait_exit(60) == EXIT_STARTUP
    assert "another shmcache daemon is already serving" in second.log_text()
    assert daemon.health() is not None and daemon.health()["ready"]  # type: ignore[index]


@pytest.mark.parametrize("case", ["regular file", "directory", "too long", "no directory"])
def test_a_socket_path_that_cannot_be_ours_is_a_clear_startup_error(
        case: str, tmp_path: Path, model_paths: dict[str, Path]) -> None:
    """Exit 1 with the reason, and nothing at the path touched: a regular file given as
    --socket by mistake was unlinked as a "stale socket"; the others were tracebacks."""
    path = tmp_path / "given"
    message = {"regular file": "exists and is not a socket",
               "directory": "exists and is not a socket",
               "too long": "a Unix socket's path can be at most 107",
               "no directory": "cannot create socket directory"}[case]
    if case == "regular file":
        path.write_text("important")
    elif case == "directory":
        path.mkdir()
    elif case == "too long":  # the client socket would fit; its control socket would not
        path = tmp_path / ("s" * (105 - len(os.fsencode(tmp_path)) - 1))
        assert len(os.fsencode(path)) == 105
    else:  # under a dangling symlink: no directory can be made there
        os.symlink(tmp_path / "nowhere" / "x", tmp_path / "link")
        path = tmp_path / "link" / "s.sock"
    d = Daemon(tmp_path, {"mlp": model_paths["mlp"]}, workers=1, extra=["--socket", str(path)])
    assert d.wait_exit(60) == EXIT_STARTUP
    text = d.log_text()
    assert message in text and "Traceback" not in text, text[-2000:]
    if case == "regular file":
        assert path.read_text() == "important"
    assert d.segments() == []


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a model at all", "is not an ONNX model"),
    (models.string_input().SerializeToString(), "input(s) 'x' (STRING) cannot be sent"),
], ids=["missing", "not-onnx", "string-input"])
def test_bad_model_file_is_a_clear_startup_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    d = Daemon(tmp_path, {"bad": path})
    assert d.wait_exit(60) == EXIT_STARTUP
    assert message in d.log_text()
    assert d.segments() == [] and not d.socket.exists()


def test_socket_directory_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    d = Daemon(tmp_path, extra=["--socket", str(blocker / "sub" / "s.sock")])
    assert d.wait_exit(60) == EXIT_STARTUP
    assert "cannot create socket directory" in d.log_text()


def unloadable_model() -> object:
    """Parses as ONNX (so the segment builds) but ONNX Runtime cannot create a session."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_hung_worker_is_killed_replaced_and_counted(tmp_path: Path) -> None:
    """A worker that stops answering (SIGSTOP: no heartbeat) is killed and replaced, and the
    restart is counted like a crash's (its exit used to read as a stop the daemon asked for)."""
    d = Daemon(tmp_path, {"m": models.save(models.mlp(), tmp_path / "m.onnx")}, workers=1,
               extra=["--heartbeat-timeout", "3", "--standby", "0"]).wait_ready()
    try:
        (hung,) = d.worker_pids()
        os.kill(hung, signal.SIGSTOP)
        wait_until(lambda: hung not in d.worker_pids(None) and len(d.worker_pids()) == 1, 60,
                   "hung worker replaced")
        assert d.status()["restarts"] == 1
        assert f"worker {hung} silent for" in d.log_text()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_a_stopped_supervisor_does_not_blame_its_workers(tmp_path: Path) -> None:
    """SIGSTOP of the supervisor past heartbeat_timeout (a frozen cgroup, a paused VM): the
    workers served all along, and their heartbeats wait unread; none is killed as silent."""
    d = Daemon(tmp_path, {"m": models.save(models.mlp(), tmp_path / "m.onnx")}, workers=2,
               extra=["--heartbeat-timeout", "3", "--standby", "0"]).wait_ready()
    try:
        workers = sorted(d.worker_pids())
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            with shmcache.Client(str(d.socket)) as c:
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:  # the workers serve meanwhile
                    c.run("m", None, {"x": np.zeros((1, 16), np.float32)})
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert sorted(d.worker_pids()) == workers
        assert d.status()["restarts"] == 0
        assert "silent for" not in d.log_text()
        assert "did not run for" in d.log_text()
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_boot_loop_stops_the_daemon_with_the_reason(tmp_path: Path) -> None:
    path = models.save(unloadable_model(), tmp_path / "unloadable.onnx")  # type: ignore[arg-type]
    d = Daemon(tmp_path, {"bad": path}, workers=1)
    assert d.wait_exit(120) == 3
    text = d.log_text()
    assert "failed to boot" in text and "NoSuchOperator" in text and "giving up" in text
    assert d.segments() == []


def test_workers_past_boot_timeout_count_as_boot_failures(tmp_path: Path) -> None:
    """A worker killed for not getting ready within boot_timeout failed to boot: a model
    that always loads too slowly ends in the boot-loop exit, not in endless retries."""
    path = models.save(models.mlp(), tmp_path / "m.onnx")
    d = Daemon(tmp_path, {"m": path}, workers=1,
               extra=["--boot-timeout", "1", "--max-boot-failures", "2", "--standby", "0"],
               env={"SHMCACHE_FAULT_BOOT_DELAY": "60"})
    assert d.wait_exit(60) == 3
    text = d.log_text()
    assert text.count("killed after boot_timeout") == 2
    assert "2 boot failure(s) in a row" in text and "giving up" in text
    assert d.segments() == []


def test_ping_answers_before_ready_and_infer_gets_not_ready(tmp_path: Path) -> None:
    path = models.save(unloadable_model(), tmp_path / "unloadable.onnx")  # type: ignore[arg-type]
    d = Daemon(tmp_path, {"bad": path}, workers=1, extra=["--max-boot-failures", "1000"])
    try:
        wait_until(lambda: d.socket.exists(), 30, "socket bound")
        with shmcache.Client(str(d.socket), timeout=1.0) as c:
            reply = c.ping()
            assert reply["ready"] is False
            with pytest.raises(errors.NotReady):
                c.run("bad", None, {"x": np.zeros(1, np.float32)})
        health = d.health()
        assert health is not None and health["live"] is True and health["ready"] is False
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def hang_up_before_the_answer(path: Path, op: str, times: int = 20) -> None:
    for _ in range(times):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(protocol.encode_frame({"v": 1, "id": 1, "op": op}))


def test_supervisor_survives_clients_that_hang_up_or_flood_the_early_door(
        tmp_path: Path) -> None:
    """Before any worker is ready the supervisor answers the client socket itself (0660: any
    group member). A client hanging up before its answer once crashed it (the failed send
    closed a socket its selector still held); a flood of connections could exhaust its fds."""
    path = models.save(unloadable_model(), tmp_path / "unloadable.onnx")  # type: ignore[arg-type]
    d = Daemon(tmp_path, {"bad": path}, workers=1, extra=["--max-boot-failures", "1000"])
    try:
        wait_until(lambda: d.health() is not None, 30, "control socket answering")
        hang_up_before_the_answer(d.socket, "ping")
        hang_up_before_the_answer(control_socket_path(d.socket), "health")
        assert d.health() is not None

        # A frame the early door will not read is answered not_ready (retried), not too large.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(d.socket))
            try:
                s.sendall(protocol.encode_frame({"v": 1, "id": 7, "op": "infer", "model": "bad",
                                                 "inputs": {"x": b"\0" * (2 * 2**20)}}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered after the header and hung up; the answer is still there
            reply = msgpack.unpackb(s.recv(4096)[4:])
            assert reply["ok"] is False and reply["error"]["code"] == "not_ready", reply

        # A flood: the supervisor holds at most MAX_EARLY_PEERS and closes the rest.
        before = psutil.Process(d.proc.pid).num_fds()
        flood = []
        for _ in range(MAX_EARLY_PEERS + 100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            flood.append(s)
        wait_until(lambda: psutil.Process(d.proc.pid).num_fds() >= before + MAX_EARLY_PEERS - 5,
                   10, "the early door holding its fill")
        time.sleep(0.3)
        assert psutil.Process(d.proc.pid).num_fds() <= before + MAX_EARLY_PEERS + 5
        closed = 0
        for s in flood:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
        assert closed >= 90, closed
        for s in flood:
            s.close()
        with shmcache.Client(str(d.socket), timeout=5.0) as c:
            assert c.ping()["ready"] is False
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_control_socket_rests_while_the_supervisor_is_out_of_fds(daemon: Daemon) -> None:
    """accept() failing with EMFILE crashed the supervisor; now the listener rests a moment
    and is retried, and the control socket answers again once fds are free."""
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    assert soft == hard  # raised at start: a flood of clients is capped long before it
    held = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (psutil.Process(pid).num_fds() + 3, hard))
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(control_socket_path(daemon.socket)))
            held.append(s)
        wait_until(lambda: "cannot accept on" in daemon.log_text(), 10, "accept failing")
        time.sleep(0.5)  # rests and retries
        assert daemon.proc.poll() is None
    finally:
        for s in held:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert daemon.health() is not None
    with shmcache.Client(str(daemon.socket)) as c:
        assert c.ping()["ready"] is True


def test_no_default_standby_when_no_segment_holds_blobs(tmp_path: Path) -> None:
    """fp32 Conv kernels pre-pack nothing: a cold worker is ready in milliseconds, so by
    default no spare is kept (an MLP's segment holds blobs and keeps one: test_publish)."""
    conv = models.save(models.conv_only(), tmp_path / "conv.onnx")
    d = Daemon(tmp_path, {"conv": conv}, workers=1).wait_ready()
    try:
        assert "keeping 0 standby worker(s): no served segment holds pre-packed blobs" \
            in d.log_text()
        time.sleep(1.0)  # a spare boots just after the active workers are ready
        assert [w["role"] for w in d.status()["workers"]] == ["active"]
    finally:
        assert d.stop() == 0
    assert d.segments() == []


def test_standby_takes_over_at_once_and_is_replaced(
    tmp_path: Path, model_paths: dict[str, Path]
) -> None:
    d = Daemon(tmp_path, model_paths, workers=2, extra=["--standby", "1"]).wait_ready()
    try:
        def roles() -> dict[str, list[int]]:
            out: dict[str, list[int]] = {"active": [], "standby": []}
            for w in d.status()["workers"]:
                if w["state"] == "ready":
                    out[w["role"]].append(w["pid"])
            return out

        wait_until(lambda: len(roles()["standby"]) == 1, 60, "standby ready")
        (spare,) = roles()["standby"]
        with Load(d, model_paths["mlp"]) as load:
            victim = roles()["active"][0]
            os.kill(victim, signal.SIGKILL)
            took_over = wait_until(lambda: spare in roles()["active"], 10, "standby activated")
            assert took_over
            wait_until(lambda: len(roles()["standby"]) == 1 and spare not in roles()["standby"],
                       60, "a new standby")
            load.progress(30)
        assert load.failures == []
        assert len(roles()["active"]) == 2
        assert f"activated standby worker {spare}" in d.log_text()
    finally:
        assert d.stop() == 0
    assert d.segments() == []
