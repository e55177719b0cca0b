"""Where things live by default: the client socket, the control socket, the state directory.

Every command (`serve`, `status`, `publish`, `health`, the client library) finds the daemon by
the same rule, so a bare `shmcache status` talks to a bare `shmcache serve`.
"""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "SHMCACHE_SOCKET"
SOCKET_NAME = "shmcache.sock"


def default_runtime_dir() -> Path:
    """/run/shmcache for root (systemd's RuntimeDirectory), else the user's runtime dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # set by systemd's RuntimeDirectory=
    if runtime:
        return Path(runtime.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/shmcache")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "shmcache"
    return Path(f"/tmp/shmcache-{os.geteuid()}")


def default_socket_path() -> Path:
    """The client socket: $SHMCACHE_SOCKET if set, else <runtime dir>/shmcache.sock."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return default_runtime_dir() / SOCKET_NAME


def control_socket_path(socket_path: str | os.PathLike[str]) -> Path:
    """The control socket sits beside the client socket, owner-only (mode 0600)."""
    return Path(f"{os.fspath(socket_path)}.ctl")
