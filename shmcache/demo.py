"""`shmcache demo`: the README's main job, on the model that ships with the project.

Starts a daemon (`shmcache serve`, 2 workers) on the embedded model in a private directory, sends
requests through the client library from two threads, checks every answer against an
in-process ONNX Runtime session, prints latency, each worker's shared versus private memory and
the version that answered, then stops the daemon with SIGTERM and checks nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from shmcache.client import Client
from shmcache.errors import ShmcacheError
from shmcache.paths import control_socket_path

START_TIMEOUT = 120.0


def start_daemon(socket_path: Path, workers: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "shmcache.cli", "serve", "--socket", str(socket_path),
           "--workers", str(workers), "--log-level", "warning",
           "--state-dir", str(socket_path.parent / "state")]
    return subprocess.Popen(cmd)


def wait_ready(socket_path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with Client(control_socket_path(socket_path), timeout=5, connect_timeout=1) as control:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ShmcacheError(f"daemon exited with status {proc.returncode}")
            try:
                if control.request("health")["ready"]:
                    return
            except (ShmcacheError, OSError):
                pass
            time.sleep(0.05)
    raise ShmcacheError("daemon not ready in time")


def send_requests(socket_path: Path, count: int) -> tuple[list[float], dict[int, int], int]:
    """Requests from two threads; returns latencies, answers per version, mismatches."""
    import onnxruntime as ort

    from shmcache.cli import embedded_model_path

    from worker.runtime import SessionSettings

    # The daemon's own session options (2 workers on this machine's cores, pre-packed weights):
    # with the same options, answers through the daemon are bit-identical to in-process ones.
    settings = SessionSettings(intra_op_threads=max(1, (os.cpu_count() or 1) // 2))
    reference = ort.InferenceSession(str(embedded_model_path()), settings.options(prepacked=True),
                                     providers=["CPUExecutionProvider"])
    latencies: list[float] = []
    versions: dict[int, int] = {}
    wrong = [0]
    lock = threading.Lock()
    client = Client(socket_path)

    def worker_thread(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(count // 2):
            x = rng.standard_normal((4, 128)).astype(np.float32)
            start = time.perf_counter()
            (probs,), version = client.run_with_version("embedded", None, {"features": x})
            elapsed = time.perf_counter() - start
            (expected,) = reference.run(None, {"features": x})
            with lock:
                latencies.append(elapsed)
                versions[version] = versions.get(version, 0) + 1
                wrong[0] += int(probs.tobytes() != expected.tobytes())

    threads = [threading.Thread(target=worker_thread, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return latencies, versions, wrong[0]


def print_report(latencies: list[float], versions: dict[int, int], wrong: int,
                 status: dict[str, object]) -> None:
    from shmcache.cli import format_table, mib

    ms = np.asarray(latencies) * 1000
    print(f"{len(latencies)} requests from 2 threads, batch 4: "
          f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms; "
          f"answers bit-identical to in-process ONNX Runtime: {len(latencies) - wrong}/"
          f"{len(latencies)}")
    print("versions that answered: " + ", ".join(f"v{v}: {n}" for v, n in sorted(versions.items())))
    print()
    workers = status["workers"]
    assert isinstance(workers, list)
    print(format_table(
        [(w["pid"], w.get("role", "active"), w["served"], mib(w["shared"]), mib(w["uss"]),
          mib(w["pss"])) for w in workers],
        ["worker pid", "role", "served", "shared MiB", "private (USS) MiB", "PSS MiB"]))
    models = status["models"]
    assert isinstance(models, list)
    for m in models:
        print(f"\nmodel {m['name']} v{m['version']}: one copy of {mib(m['size'])} MiB in "
              f"/dev/shm/{m['segment']}, mapped by every worker")


def leftovers(instance_dir: Path) -> list[str]:
    """Segments of the demo's daemon still in /dev/shm, and sockets still on disk (the state
    directory is meant to persist; the demo removes it with its temporary folder)."""
    left = [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("shmcache.")
            and p.name.split(".")[1] == _instance_of(instance_dir)]
    return left + [p.name for p in instance_dir.iterdir() if p.is_socket()]


def _instance_of(directory: Path) -> str:
    from shmcache.registry import instance_id

    return instance_id(directory / "shmcache.sock")


def run_demo(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="shmcache-demo-"))
    socket_path = directory / "shmcache.sock"
    proc = start_daemon(socket_path, workers=2)
    try:
        print(f"started shmcache serve (pid {proc.pid}) with 2 workers on the embedded model, "
              f"socket {socket_path}")
        wait_ready(socket_path, proc)
        latencies, versions, wrong = send_requests(socket_path, args.requests)
        with Client(control_socket_path(socket_path)) as control:
            status = control.request("status")
        print()
        print_report(latencies, versions, wrong, status)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    left = leftovers(directory)
    shutil.rmtree(directory, ignore_errors=True)
    print(f"\ndaemon stopped (exit {code}); left behind in /dev/shm and the socket directory: "
          f"{', '.join(left) if left else 'nothing'}")
    return 0 if code == 0 and not left and not wrong else 1

