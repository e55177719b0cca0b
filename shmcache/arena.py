"""Large tensors through shared memory instead of the socket: a connection's arena.

Through the Unix socket, a call's 512 KiB input and 512 KiB output cost 2.0 ms on this 2-core
VM beyond the model's run (benchmarks/speed.py, 256 MiB MLP at batch 32, p50 per call): every
byte is copied into the kernel, out of it, into msgpack's buffer and out of it, on both sides,
in 64 KiB reads that each wake a process. Through an arena: 1.46 ms, in the same run (the rest
is thread and process wake-ups, and three copies that miss the cache after the model's run).
An arena is a memfd the *client* creates, seals against shrinking and hands to the worker once
per connection (SCM_RIGHTS); afterwards a request carries only offsets. The client copies its
inputs in once; the worker's model reads them in place; the worker copies the outputs in once;
the client copies them out once.

Layout (the client's choice, one call at a time per connection)::

    0                       in_end  out                              out + out_len   size
    +--------------------------+----+---------------------------------+-------------+
    | input tensors, each at a | .. | output region: the worker puts | (growth     |
    | 64-byte aligned offset   |    | outputs here, each 64-aligned,  |  headroom)  |
    |                          |    | while they fit                  |             |
    +--------------------------+----+---------------------------------+-------------+

Wire (``shmcache.protocol``): a tensor may be ``{dtype, shape, shm: [offset, nbytes]}`` instead
of ``{dtype, shape, data}``; an infer request may carry ``out: [offset, nbytes]``; outputs that
fit there come back as ``shm`` tensors, the others inline.

Hand-off (op ``attach``)::

    client                                   worker
    {op: attach, id}            ------->     stops reading the connection
                                <-------     {id, ok, send_fd: true}
    1 byte + SCM_RIGHTS(memfd)  ------->     recvmsg; checks the fd (below); maps it
                                <-------     {id, ok, size, limit} (or an error: the
                                             client goes on inline)

Why the worker can trust the mapping: it accepts only a memfd whose seals include
``F_SEAL_SHRINK``, which nobody can remove, so no page it has mapped can disappear under it
(a shrink would turn the worker's next read into SIGBUS). It maps at most ``limit`` bytes and
checks every offset against what it mapped. What a client writes into its own arena while its
call runs can only spoil that client's answer.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

from shmcache import errors

ALIGN = 64
MEMFD_NAME = "shmcache-arena"  # what /proc/PID/maps shows: "/memfd:shmcache-arena (deleted)"
# Calls moving less than this (inputs + outputs) stay inline. One Relu through one worker, p50
# per call, arena / inline: 64+64 KiB 0.177 / 0.169 ms, 128+128 KiB 0.207 / 0.217 ms,
# 256+256 KiB 0.303 / 0.516 ms, 1+1 MiB 1.08 / 2.42 ms, 4+4 MiB 2.60 / 8.15 ms.
MIN_BYTES = 256 * 1024
_PAGE = mmap.PAGESIZE


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _round_page(n: int) -> int:
    return max(_PAGE, (n + _PAGE - 1) // _PAGE * _PAGE)


# --- the client's side ----------------------------------------------------------------------


class ClientArena:
    """A sealed memfd and the client's read-write mapping of it; grows, never shrinks."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            self.size = _round_page(size)
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                self.map.close()
            except BufferError:  # another thread is copying through it; unmapped when done
                pass

    def __enter__(self) -> ClientArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure(self, size: int) -> None:
        """Grow to at least ``size`` bytes (doubling, so a growing workload remaps rarely)."""
        if size <= self.size:
            return
        new = _round_page(max(size, 2 * self.size))
        os.ftruncate(self.fd, new)
        self.map.close()  # every array we handed out is a copy: nothing exports it
        self.map = mmap.mmap(self.fd, new)
        self.size = new

    def write(self, offset: int, arr: np.ndarray) -> None:
        """Copy a C-contiguous array's bytes to ``offset``."""
        dst = np.frombuffer(self.map, np.uint8, arr.nbytes, offset)
        dst[:] = arr.reshape(-1).view(np.uint8)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A copy of ``nbytes`` at ``offset`` (the region is reused by the next call), writable
        like the arrays ONNX Runtime returns, for the same one copy a bytes slice costs."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise errors.Malformed(f"reply refers to arena bytes [{offset}, {offset + nbytes}) "
                                   f"outside its {self.size} bytes")
        copy = np.empty(nbytes, np.uint8)
        copy[:] = np.frombuffer(self.map, np.uint8, nbytes, offset)
        return copy.data


# --- the worker's side ----------------------------------------------------------------------


def check_arena_fd(fd: int, limit: int) -> int:
    """The size of a client's memfd if the worker may map it; else ``Malformed`` saying why."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise errors.Malformed("arena must be a memfd (got something that is not a file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise errors.Malformed(f"arena must be a sealable memfd: {exc.strerror}") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise errors.Malformed("arena memfd must be sealed with F_SEAL_SHRINK")
    if info.st_size <= 0 or info.st_size > limit:
        raise errors.Malformed(f"arena of {info.st_size} bytes; the limit is {limit}")
    return info.st_size


@dataclass
class WorkerArena:
    """The worker's mapping of one connection's arena (owns the fd)."""

    fd: int
    limit: int
    map: mmap.mmap

    @classmethod
    def adopt(cls, fd: int, limit: int) -> WorkerArena:
        """Take ownership of a received fd: check it and map it, or close it and raise."""
        try:
            size = check_arena_fd(fd, limit)
            return cls(fd, limit, mmap.mmap(fd, size))
        except OSError as exc:
            os.close(fd)
            raise errors.Malformed(f"arena cannot be mapped: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    @property
    def size(self) -> int:
        return len(self.map)

    def close(self) -> None:
        """Close the fd; the mapping goes when the last array over it does (a model may still
        be reading a request's inputs)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes ``[offset, offset + nbytes)``, remapping once if the client grew the arena."""
        end = offset + nbytes
        if offset < 0 or nbytes < 0 or end > self.limit:
            raise errors.Malformed(f"arena range [{offset}, {end}) is outside 0..{self.limit}")
        if end > len(self.map):
            self._remap(end)
        return memoryview(self.map)[offset:end]

    def _remap(self, needed: int) -> None:
        size = min(os.fstat(self.fd).st_size, self.limit)
        if needed > size:
            raise errors.Malformed(f"arena range ends at {needed}, the arena has {size} bytes")
        # The old mapping stays valid for arrays still over it; it goes with the last of them.
        self.map = mmap.mmap(self.fd, size)

    def place(self, arrays: list[np.ndarray], out: tuple[int, int]) -> list[int | None]:
        """Copy arrays into the output region in order while they fit; the offset of each, or
        None for the ones that go inline."""
        start, length = out
        cursor, end = start, start + length
        offsets: list[int | None] = []
        for arr in arrays:
            n = arr.nbytes
            if cursor + n > end:
                offsets.append(None)
                continue
            dst = np.frombuffer(self.view(cursor, n), np.uint8)
            dst[:] = arr.reshape(-1).view(np.uint8)  # wire_array made it C-contiguous
            offsets.append(cursor)
            cursor = align(cursor + n)
        return offsets
