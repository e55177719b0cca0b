"""Names of shmcache's shared-memory objects, and finding the ones whose creator is gone.

Every object this project puts in /dev/shm is named::

    shmcache.<instance>.<pid>.<model>.v<version>.<random>
       |         |        |      |        |         +- 6 hex: exclusive-create retry token
       |         |        |      |        +----------- weight version
       |         |        |      +-------------------- model name ([A-Za-z0-9_-], <= 64)
       |         |        +--------------------------- pid of the creating process
       |         +------------------------------------ 8 hex of the daemon's socket path
       +---------------------------------------------- project prefix (the sweep's filter)

The pid in the name lets a sweep judge an object it cannot even read (a creator killed between
shm_open and ftruncate leaves a zero-byte object with no header). The instance lets a restarted
daemon find what its crashed predecessor left, and leaves other daemons' segments alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass

import posix_ipc
import psutil

from shmcache.errors import SegmentNotFound, ShmcacheError
from shmcache.segment import HEADER, HEADER_SIZE, MAGIC, SHM_DIR, STATE_SEALED, OwnedSegment

PREFIX = "shmcache."
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME = re.compile(
    r"shmcache\.(?P<instance>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<model>[A-Za-z0-9_-]{1,64})"
    r"\.v(?P<version>\d+)\.(?P<token>[0-9a-f]{6})"
)


def check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ShmcacheError(
            f"model name {name!r} must be 1-64 characters of letters, digits, '_' or '-'"
        )
    return name


def instance_id(socket_path: str | os.PathLike[str]) -> str:
    """A short stable id for the daemon serving ``socket_path``."""
    real = os.path.realpath(os.fspath(socket_path))
    return hashlib.sha256(real.encode()).hexdigest()[:8]


def segment_name(instance: str, model: str, version: int, pid: int | None = None) -> str:
    """A fresh name; ``pid`` is the owner's (the daemon's, when a helper builds for it)."""
    owner = pid or os.getpid()
    return f"{PREFIX}{instance}.{owner}.{check_model_name(model)}.v{version}.{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Found:
    """One object of ours in /dev/shm and what could be read of it."""

    name: str
    size: int
    instance: str | None
    pid: int | None
    model: str | None
    version: int | None
    sealed: bool
    created_ns: int | None
    creator_alive: bool

    @property
    def orphan(self) -> bool:
        return not self.creator_alive


def list_objects(instance: str | None = None) -> list[Found]:
    """Every shmcache object in /dev/shm (optionally of one instance), oldest first."""
    found = []
    for entry in os.scandir(SHM_DIR):
        if entry.name.startswith(PREFIX) and entry.is_file(follow_symlinks=False):
            item = describe(entry.name)
            if item is not None and (instance is None or item.instance == instance):
                found.append(item)
    return sorted(found, key=lambda f: (f.created_ns or 0, f.name))


def describe(name: str) -> Found | None:
    """Read what can be read of an object without trusting it; None if it vanished."""
    path = os.path.join(SHM_DIR, name)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_SIZE)
            mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None
    except PermissionError:
        raw, size, mtime_ns = b"", 0, 0
    match = _NAME.fullmatch(name)
    pid = int(match["pid"]) if match else None
    sealed, created, model, version = False, None, None, None
    if len(raw) == HEADER_SIZE and raw[:8] == MAGIC:
        fields = HEADER.unpack(raw)
        sealed = fields[2] == STATE_SEALED
        pid = fields[8] or pid  # a daemon that adopted the segment rewrote the creator
        created = fields[7] or None
        model = fields[4].rstrip(b"\0").decode("utf-8", "replace")
        version = fields[5]
    if match:
        model = model or match["model"]
        version = version if version is not None else int(match["version"])
    return Found(
        name, size, match["instance"] if match else None, pid, model, version, sealed,
        created or mtime_ns or None, pid is not None and process_alive(pid, created or mtime_ns),
    )


def process_alive(pid: int, since_ns: int | None) -> bool:
    """Whether ``pid`` runs and is the same process that existed at ``since_ns`` (not a reuse)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # A process started after the object was created cannot be its creator; allow clock slack.
    return since_ns is None or started <= since_ns / 1e9 + 1.0


def remove(name: str) -> bool:
    """Unlink one object by name; False when it was already gone."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True


def sweep_orphans(instance: str | None = None, *, dry_run: bool = False) -> list[Found]:
    """Remove the objects whose creator is dead; return what was (or would be) removed."""
    orphans = [f for f in list_objects(instance) if f.orphan]
    if not dry_run:
        orphans = [f for f in orphans if still_orphaned(f.name) and remove(f.name)]
    return orphans


def still_orphaned(name: str) -> bool:
    """Read the creator again right before unlinking: a restarted daemon may have adopted
    the object since it was listed (``adopt`` rewrites the creator)."""
    found = describe(name)
    return found is not None and found.orphan


def adopt(name: str) -> OwnedSegment:
    """Take ownership of a dead creator's sealed segment (a restarted daemon re-attaching).
    SegmentNotFound if it is gone (``shmcache cleanup`` may sweep it meanwhile)."""
    try:
        size = os.stat(os.path.join(SHM_DIR, name)).st_size
        owned = OwnedSegment(name, size)
        owned.take_over()
    except (FileNotFoundError, posix_ipc.ExistentialError) as exc:
        raise SegmentNotFound(f"segment {name!r} vanished before it could be adopted") from exc
    return owned
