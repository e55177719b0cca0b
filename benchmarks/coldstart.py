#!/usr/bin/env python3
"""Cold-start benchmark: time to ready for the daemon and for a replaced worker, next to a naive
worker that loads the model itself, all in the same run.

Prints, for a 256 MiB MLP:

  * naive worker: a fresh ``python -c`` that imports onnxruntime, creates an InferenceSession
    from the .onnx file, runs one warm-up inference and says ready (spawn to ready);
  * supervisor start to ready (``health`` says ready) with 1 and with 4 workers — this includes
    building the segment;
  * a replaced worker in the default configuration (pre-packed segments, one warm standby):
    SIGKILL an active worker (1 and 4 workers), time until ``status`` shows as many active
    workers ready again, the victim not among them; the standby is what takes over;
  * a replaced worker with no standby (``--standby 0``), i.e. a new worker booted cold from the
    existing segment: time until ``health`` is ready again and ``status`` shows a new pid ready;
    next to it, what the supervisor logged ("worker N ready in X s", spawn to ready, without
    our polling delay). This is also what a second death costs while the spare is rebooting.

Each is repeated ``--repeat`` times; the rounds interleave every kind of measurement so noise on
the host spreads over all of them (STYLE.md principle 12). Medians and ratios to the naive worker.

Target (issue): a replaced worker ready in at most a quarter of the naive time; judged on the
default configuration, the cold replacement printed next to it.

Polling: ``health`` every 5 ms (cheap: the supervisor answers from its own state). ``status`` is
not polled: it asks each worker for counters and reads every worker's smaps through psutil,
which would steal CPU from the booting worker on 2 cores; it is asked once, to confirm the pid.

Usage: python benchmarks/coldstart.py [--mib 256] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Daemon, make_mlp, shm_leftovers, table  # noqa: E402

POLL = 0.005
TARGET_RATIO = 0.25
MAX_ATTEMPTS = 4

NAIVE = r"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[2])
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
print("ready", flush=True)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per worker (default: the daemon's, cores // workers); "
                        "the naive worker uses cores // 1")
    return p.parse_args()


def naive_worker(path: Path, threads: int) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", NAIVE, str(path), str(threads)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.wait()
    if line.strip() != "ready":
        raise RuntimeError(f"naive worker failed (exit {proc.returncode})")
    return elapsed


def replace_one(daemon: Daemon, timeout: float = 120.0) -> tuple[float, float]:
    """SIGKILL one worker; (kill to ready as polled, supervisor's spawn-to-ready)."""
    before = {w["pid"] for w in daemon.status()["workers"]}
    victim = min(before)
    with daemon.control() as ctl:
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        # ready stays true until the supervisor reaps the victim; then false until the new one
        # is ready. Spawning needs the reap, so the new worker cannot be ready before "false".
        seen_down = False
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            ready = ctl.request("health")["ready"]
            if not ready:
                seen_down = True
            elif seen_down:
                elapsed = time.perf_counter() - t0
                break
            time.sleep(POLL)
        else:
            raise TimeoutError(f"no replacement ready after {timeout}s:\n{daemon.log()}")
    workers = daemon.status()["workers"]
    fresh = [w for w in workers if w["pid"] != victim and w["state"] == "ready"]
    new_pids = {w["pid"] for w in fresh} - before
    if victim in {w["pid"] for w in workers} or len(new_pids) != 1:
        raise RuntimeError(f"unexpected workers after replacing {victim}: {workers}")
    (new_pid,) = new_pids
    return elapsed, daemon.ready_lines()[new_pid]


def takeover_by_standby(daemon: Daemon, workers: int, timeout: float = 120.0) -> float:
    """SIGKILL an active worker of a daemon run with ``--standby 1``; seconds until status
    shows ``workers`` active ready workers again, the victim not among them (polled)."""
    def active() -> set[int]:
        with daemon.control() as ctl:
            status = ctl.request("status")
        return {w["pid"] for w in status["workers"]
                if w["state"] == "ready" and w.get("role") == "active"}

    deadline = time.perf_counter() + timeout
    while len(active()) < workers or not any(
            w.get("role") == "standby" and w["state"] == "ready"
            for w in daemon.status()["workers"]):
        if time.perf_counter() > deadline:
            raise TimeoutError("standby never ready")
        time.sleep(POLL)
    victim = min(active())
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    while True:
        now_active = active()
        if victim not in now_active and len(now_active) >= workers:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"no takeover after {timeout}s:\n{daemon.log()}")
        time.sleep(POLL)


class VanishedSegment(Exception):
    """Someone else unlinked our segment mid-run (seen: a concurrent pytest session's leak
    sweep in tests/conftest.py removes every new shmcache.* name); the round is redone."""


@contextmanager
def stopped_after(daemon: Daemon, codes: list[int]) -> Iterator[Daemon]:
    """Stop the daemon on the way out, recording its exit status; a failure caused by someone
    else unlinking our segment becomes VanishedSegment, so the round is redone."""
    try:
        yield daemon
    except Exception as exc:
        if "SegmentNotFound" in daemon.log():
            raise VanishedSegment(f"{daemon.sock.name}: {exc!r}"[:200]) from exc
        raise
    finally:
        codes.append(daemon.stop())


def measure_daemon(sock: Path, model: Path, workers: int, threads: int | None,
                   codes: list[int]) -> tuple[float, float]:
    """Default daemon: time it to ready, SIGKILL an active worker; (start, takeover)."""
    with stopped_after(Daemon(sock, {"mlp": model}, workers=workers, threads=threads),
                       codes) as daemon:
        up = daemon.wait_ready()
        return up, takeover_by_standby(daemon, workers)


def measure_cold(sock: Path, model: Path, workers: int, threads: int | None,
                 codes: list[int]) -> tuple[float, float]:
    """No standby: replace one worker cold; (kill-to-ready polled, logged spawn-to-ready)."""
    with stopped_after(Daemon(sock, {"mlp": model}, workers=workers, threads=threads,
                              extra=["--standby", "0"]), codes) as daemon:
        daemon.wait_ready()
        return replace_one(daemon)


def med(values: list[float]) -> float:
    return statistics.median(values)


def with_retries(what: str, vanished: list[str], sockets: list[Path], tmpdir: Path,
                 measure: Callable[[Path], tuple[float, float]]) -> tuple[float, float]:
    for attempt in range(MAX_ATTEMPTS):
        sock = tmpdir / f"{what}a{attempt}.sock"
        sockets.append(sock)
        try:
            return measure(sock)
        except VanishedSegment as exc:
            vanished.append(str(exc))
    raise RuntimeError(f"segment vanished {MAX_ATTEMPTS} times: {vanished}")


def main() -> int:
    args = parse_args()
    cores = os.cpu_count() or 1
    naive: list[float] = []
    start: dict[int, list[float]] = {1: [], 4: []}
    takeover: dict[int, list[float]] = {1: [], 4: []}
    cold: dict[int, list[float]] = {1: [], 4: []}
    logged: dict[int, list[float]] = {1: [], 4: []}
    codes: list[int] = []
    vanished: list[str] = []
    sockets: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="shmcache-cold-") as tmp:
        tmpdir = Path(tmp)
        model = make_mlp(tmpdir / "mlp.onnx", args.mib)
        naive_worker(model, cores)  # page cache warm for everyone, not timed
        for r in range(args.repeat):
            for workers in (1, 4):
                naive.append(naive_worker(model, args.threads or cores))
                up, took = with_retries(
                    f"r{r}w{workers}", vanished, sockets, tmpdir,
                    lambda sock: measure_daemon(sock, model, workers, args.threads, codes))
                polled, log_s = with_retries(
                    f"r{r}w{workers}cold", vanished, sockets, tmpdir,
                    lambda sock: measure_cold(sock, model, workers, args.threads, codes))
                start[workers].append(up)
                takeover[workers].append(took)
                cold[workers].append(polled)
                logged[workers].append(log_s)
                print(f"round {r + 1}/{args.repeat}, {workers} worker(s): naive {naive[-1]:.3f}s "
                      f"start {up:.3f}s replaced {took:.3f}s; with --standby 0: {polled:.3f}s "
                      f"(log {log_s:.3f}s)", file=sys.stderr, flush=True)
    leaked = shm_leftovers(sockets)
    base = med(naive)

    def row(label: str, values: list[float]) -> list[object]:
        return [label, len(values), f"{med(values):.3f}", f"{min(values):.3f}",
                f"{max(values):.3f}", f"{med(values) / base:.2f}"]

    rows = [row("naive worker: python -c, InferenceSession(.onnx), 1 inference", naive)]
    for w in (1, 4):
        rows.append(row(f"supervisor start to ready, {w} worker(s)", start[w]))
    for w in (1, 4):
        rows.append(row(f"replaced worker (default: standby takes over), {w} worker(s)",
                        takeover[w]))
    for w in (1, 4):
        rows.append(row(f"--standby 0: cold replacement, kill to ready (polled), {w} worker(s)",
                        cold[w]))
        rows.append(row(f"--standby 0: cold replacement, logged spawn to ready, {w} worker(s)",
                        logged[w]))
    print(f"cold start, {args.mib} MiB MLP, {args.repeat} interleaved rounds, seconds; "
          f"threads per worker: {args.threads or 'daemon default (cores // workers)'}, "
          f"naive worker: {args.threads or cores}")
    print(table(rows, ["measurement", "n", "median s", "min s", "max s", "ratio to naive"]))
    checks = []
    for w in (1, 4):
        ratio = med(takeover[w]) / base
        checks.append(ratio <= TARGET_RATIO)
        print(f"target (replaced worker <= {TARGET_RATIO:.2f} x naive), {w} worker(s): "
              f"{ratio:.3f} x -> {'met' if ratio <= TARGET_RATIO else 'NOT met'}; "
              f"cold, without a standby: {med(cold[w]) / base:.2f} x polled, "
              f"{med(logged[w]) / base:.2f} x logged")
    print("a cold replacement of a pre-packed segment pays ONNX Runtime's re-pack of every "
          "weight at session creation (benchmarks/NOTES-prepack.md, 4); the standby maps the "
          "same shared pages and costs one worker's private memory (benchmarks/memory.py)")
    if vanished:
        print(f"rounds redone because another process unlinked our segment: {len(vanished)}")
    print(f"daemon exit statuses {codes}; /dev/shm leftovers: {leaked or 'none'}")
    return 0 if all(checks) and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
