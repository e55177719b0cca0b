"""``--lock-memory``: keep a model segment's pages in RAM with mlock(2).

Why: /dev/shm pages are swappable like anonymous memory; under memory pressure the kernel may
push cold weights out and the next request pays for reading them back. The supervisor maps
each segment once more, read-only, and locks that mapping; the lock holds as long as the
mapping does, for every process that maps the same pages (they are one shmem page set).

Why ctypes ``mmap``/``mlock`` rather than the ``mmap`` module: exporting a Python ``mmap``'s
address needs a buffer export (``ctypes.c_char.from_buffer``), which then forbids closing the
map until every export is gone; a raw mapping we own has no such coupling.

Locked bytes count against the *supervisor's* RLIMIT_MEMLOCK (unless it has CAP_IPC_LOCK). The
default soft limit is 64 KiB or 8 MiB, far below a model, so failure is the common case and the
error says what to change: ``LimitMEMLOCK=`` in the systemd unit, or ``ulimit -l``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
from pathlib import Path

from shmcache.errors import ShmcacheError
from shmcache.libc import MAP_FAILED, libc, sys_mmap

SHM_DIR = Path("/dev/shm")



class MemoryLockError(ShmcacheError):
    """A segment could not be locked in RAM; the message says which limit to raise."""


class LockedSegment:
    """A read-only mapping of a segment whose pages are locked in RAM until ``unlock()``."""

    def __init__(self, name: str, address: int, size: int) -> None:
        self.name = name
        self.address = address
        self.size = size

    @property
    def locked(self) -> bool:
        return self.address != 0

    def unlock(self) -> None:
        """munlock and unmap; idempotent, so every exit path may call it."""
        if not self.address:
            return
        address, self.address = self.address, 0
        libc().munlock(address, self.size)
        libc().munmap(address, self.size)

    def __enter__(self) -> LockedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def __repr__(self) -> str:
        return f"LockedSegment({self.name!r}, {self.size} bytes, {'locked' if self.locked else 'unlocked'})"


def lock_segment(segment: str | os.PathLike[str] | int, size: int | None = None) -> LockedSegment:
    """Map ``segment`` read-only and mlock ``size`` bytes of it (default: the whole object).

    ``segment`` is an open file descriptor, a path, or a bare segment name (looked up in
    /dev/shm). The descriptor is not kept: the mapping alone holds the pages.
    """
    if isinstance(segment, int):
        return _lock_fd(segment, f"fd {segment}", size)
    path = Path(segment)
    if os.sep not in os.fspath(segment):
        path = SHM_DIR / path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MemoryLockError(f"cannot open {path} to lock it in RAM: {exc.strerror}") from None
    try:
        return _lock_fd(fd, path.name, size)
    finally:
        os.close(fd)


def unlock(locked: LockedSegment) -> None:
    """Release a lock from ``lock_segment`` (same as ``locked.unlock()``)."""
    locked.unlock()


def _lock_fd(fd: int, name: str, size: int | None) -> LockedSegment:
    actual = os.fstat(fd).st_size
    size = actual if size is None else size
    if size < 0 or size > actual:
        raise MemoryLockError(f"cannot lock {size} bytes of {name}: it holds {actual} bytes")
    if size == 0:
        return LockedSegment(name, 0, 0)  # nothing to keep; mmap refuses a length of 0
    address = sys_mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address == MAP_FAILED:
        err = ctypes.get_errno()
        raise MemoryLockError(f"cannot map {name} to lock it in RAM: {os.strerror(err)}")
    if libc().mlock(address, size) != 0:
        err = ctypes.get_errno()
        libc().munmap(address, size)
        raise MemoryLockError(explain_failure(name, size, err))
    return LockedSegment(name, address, size)


def explain_failure(name: str, size: int, err: int) -> str:
    """The message for a failed mlock: the errno, the limit in force, and how to raise it."""
    head = f"cannot lock {size} bytes of {name} in RAM (mlock: {os.strerror(err)})"
    if err not in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
        return head
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return (f"{head}: RLIMIT_MEMLOCK is soft {format_limit(soft)}, hard {format_limit(hard)} "
            f"for this process, {format_limit(already_locked())} already locked. "
            "Raise it to at least the total size of the model segments: LimitMEMLOCK=infinity "
            "(or a size) in the systemd unit, `ulimit -l` in a shell, or "
            "/etc/security/limits.conf; or run without --lock-memory")


def format_limit(value: int) -> str:
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{value} bytes" if value < 2**20 else f"{value} bytes ({value / 2**20:.1f} MiB)"


def already_locked() -> int:
    """VmLck of this process in bytes (what already counts against RLIMIT_MEMLOCK)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
