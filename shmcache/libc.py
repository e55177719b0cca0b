"""libc through ctypes, once, with the prototypes of the calls this project makes.

Pointers and sizes need their C types declared: ctypes passes a bare Python int as a C int,
which truncates an address above 2 GiB. One loaded instance, so a prototype declared here
holds for every caller (supervisor.memlock, shmcache.hugepages, shmcache.hugemap,
worker.aligned_maps).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

MAP_FAILED = 2**64 - 1  # (void *) -1 as ctypes returns it for c_void_p


@functools.cache
def libc() -> Any:
    lib = ctypes.CDLL(None, use_errno=True)  # the process's own libc: its mmap is ORT's too
    pointer_size: list[Any] = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [*pointer_size, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = pointer_size
    lib.mlock.argtypes = pointer_size
    lib.munlock.argtypes = pointer_size
    lib.madvise.argtypes = [*pointer_size, ctypes.c_int]
    lib.mprotect.argtypes = [*pointer_size, ctypes.c_int]
    return lib


def sys_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2) itself: the address, or MAP_FAILED (errno in ctypes.get_errno())."""
    got = libc().mmap(addr, length, prot, flags, fd, offset)
    return MAP_FAILED if got is None else int(got)
