"""The version table: which weight version of each model is current, shared by every worker.

This is where the atomic swap happens. The supervisor owns one small shared-memory object per
daemon; every worker maps it read-only and reads its model's slot each time it dispatches a
request. A publish flips a model to a new version with one aligned 8-byte store, so every
request dispatched after the flip, in any worker, uses the new version, and a request already
running finishes on the version it started with.

Layout (little-endian)::

    0      8s   magic b"SHMSTATE"
    8      u32  layout version (2)
    12     u32  slot count
    16     48s  reserved
    64     slots, SLOT_SIZE (128) bytes each, one per model, in configuration order:
             0   u64  current version      <- the flip: a single aligned 8-byte store
             8   u64  flips so far
             16  48s  model name, UTF-8, NUL padded
             64  u64  count of versions coming back (0..7)
             72  7 x u64  those versions: kept versions a restart is loading again

The versions coming back only shape an error: a request pinned to one of them is told to retry
(not_ready) rather than that the version is gone (not_found). The supervisor writes the list
before the count, and a reader that catches it mid-update gets, at worst, the other error.

A slot's 8-byte words are naturally aligned inside a page-aligned mapping; x86-64 and aarch64
make such stores and loads single-copy atomic, so a reader sees the old or the new version,
never a torn one.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np
import posix_ipc

from shmcache.errors import SegmentCorrupt, SegmentError

MAGIC = b"SHMSTATE"
LAYOUT = 2
HEADER = struct.Struct("<8sII48s")
SLOT_SIZE = 128
SLOTS_AT = 64
MAX_NAME = 48
COMING_BACK = 8  # word index of the count; the versions follow
MAX_COMING_BACK = 7


def _create_object(name: str, size: int, mode: int, gid: int | None, what: str) -> mmap.mmap:
    """A new shared-memory object of ``size`` bytes, mapped read-write, with the mode we
    promised (shm_open applies the umask) and the group, if any."""
    try:
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=mode, size=size)
    except posix_ipc.ExistentialError as exc:
        raise SegmentError(f"{what} {name!r} already exists") from exc
    try:
        os.fchmod(shm.fd, mode)
        if gid is not None:
            os.fchown(shm.fd, -1, gid)
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


class VersionTable:
    """A view of the table; ``writable`` only in the supervisor that created it."""

    def __init__(self, name: str, mem: mmap.mmap, writable: bool) -> None:
        self.name = name
        self._mem = mem
        magic, layout, count, _ = HEADER.unpack_from(mem, 0)
        if magic != MAGIC or layout != LAYOUT or SLOTS_AT + count * SLOT_SIZE > len(mem):
            raise SegmentCorrupt(f"{name!r} is not a shmcache version table")
        self.count = count
        words = np.frombuffer(mem, np.uint64, count * SLOT_SIZE // 8, SLOTS_AT)
        self._slots = words.reshape(count, SLOT_SIZE // 8)
        self.writable = writable
        self.index = {self._name_of(i): i for i in range(count)}

    @classmethod
    def create(cls, name: str, models: list[str], mode: int = 0o600,
               gid: int | None = None) -> VersionTable:
        mem = _create_object(name, max(mmap.PAGESIZE, SLOTS_AT + SLOT_SIZE * len(models)),
                             mode, gid, "version table")
        HEADER.pack_into(mem, 0, MAGIC, LAYOUT, len(models), b"")
        for i, model in enumerate(models):
            raw = model.encode("utf-8")[:MAX_NAME]
            mem[SLOTS_AT + i * SLOT_SIZE + 16 : SLOTS_AT + i * SLOT_SIZE + 16 + len(raw)] = raw
        return cls(name, mem, writable=True)

    @classmethod
    def attach(cls, name: str) -> VersionTable:
        shm = posix_ipc.SharedMemory("/" + name, read_only=True)
        try:
            size = os.fstat(shm.fd).st_size
            mem = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        return cls(name, mem, writable=False)

    def _name_of(self, slot: int) -> str:
        at = SLOTS_AT + slot * SLOT_SIZE + 16
        return bytes(self._mem[at : at + MAX_NAME]).rstrip(b"\0").decode("utf-8", "replace")

    def current(self, slot: int) -> int:
        """The version requests of this model use now (one 8-byte load)."""
        return int(self._slots[slot, 0])

    def flips(self, slot: int) -> int:
        return int(self._slots[slot, 1])

    def flip(self, slot: int, version: int) -> None:
        """Make ``version`` current for every worker at once (one aligned 8-byte store)."""
        if not self.writable:
            raise SegmentError("the version table is read-only in this process")
        self._slots[slot, 0] = version
        self._slots[slot, 1] += 1

    def coming_back(self, slot: int) -> list[int]:
        """The kept versions of this model a restart is loading again (see the layout)."""
        count = min(int(self._slots[slot, COMING_BACK]), MAX_COMING_BACK)
        return [int(v) for v in self._slots[slot, COMING_BACK + 1 : COMING_BACK + 1 + count]]

    def set_coming_back(self, slot: int, versions: list[int]) -> None:
        """Record the versions coming back (at most the first seven: a hint, not a promise)."""
        if not self.writable:
            raise SegmentError("the version table is read-only in this process")
        shown = versions[:MAX_COMING_BACK]
        self._slots[slot, COMING_BACK] = 0
        self._slots[slot, COMING_BACK + 1 : COMING_BACK + 1 + len(shown)] = shown
        self._slots[slot, COMING_BACK] = len(shown)

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory("/" + self.name)
        except posix_ipc.ExistentialError:
            pass


class ConnectionBoard:
    """How many client connections each accepting worker holds, shared by the workers so the
    least-connected one takes the next connection (worker.server.Acceptor).

    Layout (little-endian)::

        0      8s   magic b"SHMBOARD"
        8      u32  layout version (1)
        12     u32  slot count
        16     48s  reserved
        64     u32 per slot: 0 = its worker accepts nothing (none, booting, a standby, gone);
                             n + 1 = it accepts and holds n connections

    The supervisor creates it and gives each worker a slot; a worker writes only its own
    (aligned 4-byte stores, so a reader sees the old count or the new one) and reads the
    others'. The supervisor clears a dead worker's slot. Counts only steer who accepts first:
    a wrong one costs balance for a moment, never a connection.
    """

    MAGIC = b"SHMBOARD"
    LAYOUT = 1
    SLOTS = 1024

    def __init__(self, name: str, mem: mmap.mmap) -> None:
        self.name = name
        self._mem = mem
        magic, layout, count, _ = HEADER.unpack_from(mem, 0)
        if magic != self.MAGIC or layout != self.LAYOUT or SLOTS_AT + 4 * count > len(mem):
            raise SegmentCorrupt(f"{name!r} is not a shmcache connection board")
        self.count = count
        self._slots = np.frombuffer(mem, np.uint32, count, SLOTS_AT)

    @classmethod
    def create(cls, name: str, mode: int = 0o600, gid: int | None = None) -> ConnectionBoard:
        mem = _create_object(name, SLOTS_AT + 4 * cls.SLOTS, mode, gid, "connection board")
        HEADER.pack_into(mem, 0, cls.MAGIC, cls.LAYOUT, cls.SLOTS, b"")
        return cls(name, mem)

    @classmethod
    def attach(cls, name: str) -> ConnectionBoard:
        shm = posix_ipc.SharedMemory("/" + name)
        try:
            mem = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
        finally:
            shm.close_fd()
        return cls(name, mem)

    def post(self, slot: int, connections: int | None) -> None:
        """Say this slot's worker holds ``connections``; None: it accepts nothing."""
        self._slots[slot] = 0 if connections is None else connections + 1

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other accepting worker holds; None if none accepts."""
        others = np.delete(self._slots, slot)
        accepting = others[others > 0]
        return int(accepting.min()) - 1 if accepting.size else None

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory("/" + self.name)
        except posix_ipc.ExistentialError:
            pass
