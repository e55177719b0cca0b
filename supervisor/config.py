"""The daemon's configuration: one typed object, built once at the edge and passed down.

Built by the CLI from (lowest to highest precedence) defaults, a TOML file, command-line flags
and ``SHMCACHE_*`` environment variables; validated here, so the supervisor trusts it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from shmcache.errors import ShmcacheError
from shmcache.paths import control_socket_path, default_socket_path
from shmcache.protocol import DEFAULT_MAX_FRAME
from shmcache.registry import check_model_name


class ConfigError(ShmcacheError):
    """An option has an invalid value; the message names the option."""


def seconds(value: float, low: float, high: float) -> bool:
    """A duration in range: NaN and infinity are not (a NaN heartbeat_timeout never fired)."""
    return math.isfinite(value) and low <= value <= high


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=PATH``, or a bare ``PATH`` whose file stem becomes the name."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text).stem
        if not path:
            raise ConfigError(f"models: {text!r} has no path")
        try:
            check_model_name(name)
        except ShmcacheError as exc:
            raise ConfigError(f"models.{name}: {exc}") from None
        # Absolute (not resolved: a symlink stays one): the manifest records the configured
        # file, and a relative path was read against the state directory on the next start.
        return cls(name, Path(path).expanduser().absolute())


def default_state_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/shmcache")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shmcache"


@dataclass
class ServeConfig:
    models: list[ModelSpec] = field(default_factory=list)
    workers: int = 2
    standby: int | None = None  # warm spares taking over a dead worker; None: see spares()
    socket: Path = field(default_factory=default_socket_path)
    threads: int | None = None  # intra-op threads per worker; None: max(1, cores // workers)
    max_inflight: int = 64
    max_frame: int = DEFAULT_MAX_FRAME
    graceful_timeout: float = 30.0
    stall_timeout: float = 30.0  # seconds a client may leave a frame half-sent (worker.server)
    boot_timeout: float = 600.0
    # A hung worker's clients get a connection error, which they retry on another worker,
    # within their own default timeout (30 s) rather than a Timeout at it. Session creation
    # and inference run with the GIL released, off the worker's loop: its beat is never late
    # by more than milliseconds while it works.
    heartbeat_timeout: float = 10.0
    warmup_parallel: int = 2
    build_parallel: int = 2
    max_boot_failures: int = 5
    optimization: str = "all"
    prepack: bool = True
    state_dir: Path = field(default_factory=default_state_dir)
    keep: int = 1
    group: str | None = None
    metrics_address: str | None = None
    lock_memory: bool = False
    release_memory: bool = True  # idle workers return working memory to the OS (no ORT arena)
    huge_pages: bool = True  # a publish's transient re-packs (shmcache.hugepages) and the
    # mapped weights (shmcache.hugemap) on huge pages
    spin: float = 0.00025  # seconds a worker stays on the CPU after a request (0: never)
    log_level: str = "info"

    @property
    def control_socket(self) -> Path:
        return control_socket_path(self.socket)

    def spares(self, blobs: bool) -> int:
        """Warm standby workers to keep. By default one when a served segment holds pre-packed
        blobs (``blobs``): a cold replacement then pays ONNX Runtime's re-pack of every weight
        at session creation (about half a naive load), while a spare maps the same shared
        pages and takes over in milliseconds for the cost of one more process's private
        memory. Without blobs (plain segments, or models whose kernels pre-pack nothing, as
        fp32 Conv) a cold session is created in milliseconds and a spare would only cost."""
        if self.standby is not None:
            return self.standby
        return 1 if blobs else 0

    def intra_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // max(1, self.workers))

    def validate(self) -> ServeConfig:
        checks: list[tuple[str, bool, str]] = [
            ("workers", 1 <= self.workers <= 256, "must be 1..256"),
            ("standby", self.standby is None or 0 <= self.standby <= 16, "must be 0..16"),
            ("threads", self.threads is None or 1 <= self.threads <= 1024, "must be >= 1"),
            ("max_inflight", self.max_inflight >= 1, "must be >= 1"),
            ("max_frame", 1024 <= self.max_frame <= 2**32 - 1, "must be 1 KiB .. 4 GiB"),
            ("graceful_timeout", seconds(self.graceful_timeout, 0.1, 3600), "must be 0.1 .. 3600 s"),
            ("stall_timeout", seconds(self.stall_timeout, 0.1, 3600), "must be 0.1 .. 3600 s"),
            ("boot_timeout", seconds(self.boot_timeout, 1, 86400), "must be 1 .. 86400 s"),
            # >= 3 heartbeats (one a second): fewer killed healthy workers in a loop
            ("heartbeat_timeout", seconds(self.heartbeat_timeout, 3, 3600), "must be 3 .. 3600 s"),
            ("max_boot_failures", self.max_boot_failures >= 1, "must be >= 1"),
            ("warmup_parallel", self.warmup_parallel >= 1, "must be >= 1"),
            ("build_parallel", self.build_parallel >= 1, "must be >= 1"),
            ("keep", self.keep >= 0, "must be >= 0"),
            ("spin", seconds(self.spin, 0, 0.1), "must be 0 .. 0.1 seconds"),
            ("optimization", self.optimization in ("disabled", "basic", "extended", "all"),
             "must be one of disabled, basic, extended, all"),
            ("log_level", self.log_level in ("debug", "info", "warning", "error"),
             "must be debug, info, warning or error"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r}: {why}")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"models: name(s) given twice: {', '.join(duplicates)}")
        return self

    def group_id(self) -> int | None:
        if self.group is None:
            return None
        import grp

        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ConfigError(f"group = {self.group!r}: no such group") from None
