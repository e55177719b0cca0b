"""Start a real `shmcache serve` in a subprocess for tests, and watch it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shmcache.client import Client
from shmcache.errors import ShmcacheError
from shmcache.paths import control_socket_path
from shmcache.registry import instance_id

ROOT = Path(__file__).resolve().parents[2]
STARTED: list[Daemon] = []  # killed by tests/supervisor/conftest.py if a test leaves one


def wait_until(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Daemon:
    def __init__(self, tmp: Path, models: dict[str, Path] | None = None, workers: int = 2,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.tmp = tmp
        self.socket = tmp / "d.sock"
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "shmcache.cli", "serve", "--socket", str(self.socket),
               "--workers", str(workers), "--log-level", "debug",
               "--state-dir", str(tmp / "state")]
        for name, path in (models or {}).items():
            cmd += ["--model", f"{name}={path}"]
        cmd += extra or []
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stderr=self.log, stdout=self.log, cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        STARTED.append(self)

    @property
    def instance(self) -> str:
        return instance_id(self.socket)

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def control(self, op: str, **fields: object) -> dict[str, Any]:
        with Client(control_socket_path(self.socket), timeout=10, connect_timeout=2) as c:
            return c.request(op, **fields)

    def health(self) -> dict[str, Any] | None:
        try:
            return self.control("health")
        except (ShmcacheError, OSError):
            return None

    def wait_ready(self, timeout: float = 120.0) -> Daemon:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            h = self.health()
            return bool(h and h["ready"])

        wait_until(ready, timeout, "daemon ready")
        return self

    def status(self) -> dict[str, Any]:
        return self.control("status")

    def worker_pids(self, state: str | None = "ready", role: str | None = "active") -> list[int]:
        """Pids of the workers in ``state`` with ``role`` ("active", "standby"; None: any)."""
        return [w["pid"] for w in self.status()["workers"]
                if (state is None or w["state"] == state) and (role is None or w["role"] == role)]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def segments(self) -> list[str]:
        return [p.name for p in Path("/dev/shm").iterdir()
                if p.name.startswith(f"shmcache.{self.instance}.")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.wait_exit(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.wait_exit(10)
        self.log.close()
        return self.proc.returncode


@contextmanager
def serving(tmp: Path, models: dict[str, Path], workers: int = 2,
            extra: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """A ready daemon for one test; at the end it must stop cleanly and leave no segment."""
    d = Daemon(tmp, models, workers=workers, extra=extra, env=env)
    try:
        yield d.wait_ready()
    finally:
        code = d.stop()
        assert d.segments() == [], "segments left in /dev/shm"
        assert code == 0, d.log_text()
