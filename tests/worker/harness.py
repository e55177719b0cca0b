"""Run one real worker process (no supervisor) on real segments and a real socket, for tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shmcache import protocol
from shmcache.model import build_model_segment, load_model, model_digest
from shmcache.registry import instance_id, segment_name
from shmcache.segment import OwnedSegment
from worker.prepack import cached_prepack, write_prepacked_segment

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = """
import json, socket, sys
from worker.runtime import SessionSettings
from worker.server import WorkerConfig, run_worker
spec = json.loads(sys.argv[1])
settings = SessionSettings(**spec.pop("settings"))
listener = socket.socket(fileno=spec.pop("listen_fd"))
control = socket.socket(fileno=spec.pop("control_fd"))
sys.exit(run_worker(WorkerConfig(settings=settings, **spec), listener, control))
"""


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], control: socket.socket, path: Path) -> None:
        self.proc = proc
        self.control = control
        self.socket_path = path
        self.decoder = protocol.FrameDecoder()
        self.pending: list[dict] = []

    def read_control(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.control.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.control.recv(65536)
            if not data:
                raise EOFError("worker closed its control channel")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def wait_for(self, op: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read_control(deadline - time.monotonic())
            if msg.get("op") in (op, "boot_failed"):
                return msg


def build_segment(path: Path, name: str, model: str, tmp_path: Path, prepack: bool,
                  level: str) -> OwnedSegment:
    if not prepack:
        return build_model_segment(load_model(path), name=name, model_name=model, version=1)
    out = cached_prepack(path, tmp_path / "prepack-cache", level, model_digest(path))
    return write_prepacked_segment(out, name=name, model_name=model, version=1)


@contextmanager
def running_worker(tmp_path: Path, models: dict[str, Path], *, settings: dict | None = None,
                   prepack: bool = False, **config: object) -> Iterator[WorkerProcess]:
    """Build a segment per model (plain, or pre-packed by ONNX Runtime at the worker's level),
    start a worker over them, yield once it reports ready."""
    instance = instance_id(tmp_path / "w.sock")
    owned = [build_segment(path, segment_name(instance, name, 1), name, tmp_path, prepack,
                           (settings or {}).get("optimization", "all"))
             for name, path in models.items()]
    sock_path = tmp_path / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(128)
    ours, theirs = socket.socketpair()
    spec = {"models": {o.name.split(".")[3]: [o.name] for o in owned},
            "settings": settings or {}, "listen_fd": listener.fileno(),
            "control_fd": theirs.fileno(), "supervisor_pid": os.getpid(), **config}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(spec)],
                            pass_fds=(listener.fileno(), theirs.fileno()),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    listener.close()
    theirs.close()
    worker = WorkerProcess(proc, ours, sock_path)
    try:
        msg = worker.wait_for("ready")
        assert msg["op"] == "ready", msg
        yield worker
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ours.close()
        for o in owned:
            o.unlink()
