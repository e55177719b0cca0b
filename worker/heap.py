"""Giving a worker's working memory back to the OS once it is idle.

What a worker keeps privately beyond the interpreter is mostly ONNX Runtime's working memory:
activations and im2col buffers, 18 MiB for a 3x3 conv at 512 channels on 32x32. With ORT's CPU
arena, every worker keeps its peak for ever. Measured on benchmarks/memory.py's Conv model
(14 MiB of weights, 2 workers, 1 thread, pre-packed segment), private memory of an idle worker
beyond a worker serving a one-MatMul model, and the Conv call's latency in A/B runs:

==============================================  ===========  ==========================
policy                                          idle worker  Conv call vs ORT's arena
==============================================  ===========  ==========================
ORT's arena (ORT's default)                     14.1 MiB     1.00
no arena, glibc's defaults                      47 MiB       (heap fragments, never
                                                             returned)
no arena, glibc mmap threshold 128 KiB          0.3 MiB      1.20 (every call faults its
                                                             18 MiB of buffers back in)
no arena, one malloc arena, trimmed after       0.35 MiB     0.97 / 1.04 (noise); MLP
IDLE_SECONDS of idleness (this module)                       1.03 / 1.00
==============================================  ===========  ==========================

So: the session runs without ORT's arena (``SessionSettings.memory_arena``); glibc keeps freed
buffers on its heap (threshold and trim fixed, so a burst of requests reuses them without a
fault); all threads share glibc's main malloc arena, because trimming does not shrink the top
of a thread arena's heap, where a freed run's buffers end up (3.0 MiB left with per-thread
arenas); and when the worker has been idle for ``IDLE_SECONDS``, ``malloc_trim(0)`` returns
every free page (the top of the heap and free pages in the middle of it). Elsewhere than
glibc all of this is a no-op and memory behaves as malloc does.

One thing malloc_trim cannot reach: glibc's per-thread caches (tcache, glibc >= 2.26). A small
chunk freed into a thread's tcache still looks in use to malloc, so it neither merges with its
free neighbours nor is trimmed, and only that thread's exit returns it. Walking a Conv worker's
heap at rest after 100 runs found one at the start of each of the ~10 large free chunks the
run's buffers had left, holding the heap's top 30 MiB up (a page each, and the top unreturned).
So a daemon that releases memory runs with ``glibc.malloc.tcache_count=0``
(``STARTUP_TUNABLES``; read only when a process starts, so ``shmcache serve`` re-executes itself
once with it, shmcache.hugepages). Measured with benchmarks/memory.py's models, 2 workers,
pre-packed, the private memory of an idle worker (USS without the file pages it alone maps,
which are page cache) and what the Conv model adds to it over the tiny model:

===========  ======================  ======================  =========================
tcache       Conv worker             tiny-model worker       Conv - tiny (target 289)
===========  ======================  ======================  =========================
on           21.5-21.6 MiB           21.3-21.4 MiB           96-322 KiB, mean 171 (9)
off (this)   20.9-21.0 MiB           20.8-20.9 MiB           -20-154 KiB, mean 71 (8)
===========  ======================  ======================  =========================

(n) = daemons of each model. Its cost is not measurable: benchmarks/speed.py alternating a
daemon with and without (``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` set by hand), two runs
each, gave a tiny-model round trip of 108-112 us p50 both ways, and MLP ratios of 1.003-1.026x
with the cache against 1.008-1.016x without.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any

log = logging.getLogger("shmcache.worker")

IDLE_SECONDS = 1.0
M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks from this size up get their own mmap (freed at once): ORT's transient pre-packs at
# session creation (64 MiB per weight of the 256 MiB MLP). Everything smaller is heap.
MMAP_THRESHOLD = 32 * 2**20
# No trimming on free: a burst's next request would fault the same buffers back in.
TRIM_THRESHOLD = 2**30


MADV_DONTNEED = 4
PAGE = 4096
# Started with glibc.malloc.hugetlb=1 (shmcache.hugepages), glibc trims the heap's top only in
# whole 2 MiB steps, so up to 2 MiB of pages the heap once used stay resident after
# malloc_trim(0): Conv workers at 19.5-20.3 MiB instead of 19.1. trim_heap() drops them itself
# when the top holds at least TOP_RELEASE_MIN.
TOP_RELEASE_MIN = 64 * 1024
# Free chunks malloc may hand out before the top (best fit comes first). After 100 Conv runs a
# worker's heap needed 2-33 takes (32 missed the top in 3 of 6 workers): each costs a header.
TOP_TAKES = 1024


# glibc tunables for the daemon's processes while idle workers release memory (see above).
STARTUP_TUNABLES = ("glibc.malloc.tcache_count=0",)


def startup_tunables(release_memory: bool) -> tuple[str, ...]:
    """The glibc tunables ``shmcache serve`` re-executes with for this heap policy."""
    return STARTUP_TUNABLES if release_memory else ()


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def load_glibc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist only in glibc
    except (OSError, AttributeError):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33, as is the tunable trim_heap answers
        libc.mallinfo2.restype = MallInfo2
    return libc


def trim_heap(libc: Any) -> None:
    """Return every free page of the heap to the OS: malloc_trim(0), then the pages of the
    heap's top chunk that a hugetlb-tuned glibc keeps. Only memory this function holds is
    dropped: the top is taken with malloc (best fit hands out any free chunk as large first,
    so those are held too until the top comes), emptied with MADV_DONTNEED, and freed."""
    libc.malloc_trim(0)
    if not hasattr(libc, "mallinfo2"):  # older than the hugetlb tunable: trimmed already
        return
    size = int(libc.mallinfo2().keepcost) - 4 * PAGE  # room for the chunk headers
    if size < TOP_RELEASE_MIN or size >= MMAP_THRESHOLD:
        return
    held: list[int] = []
    try:
        for _ in range(TOP_TAKES):
            block = libc.malloc(size)
            if not block:
                return
            held.append(block)
            if 0 <= int(libc.sbrk(0)) - (block + size) <= 8 * PAGE:  # the top: ends at brk
                start, end = -(-block // PAGE) * PAGE, (block + size) // PAGE * PAGE
                libc.madvise(start, end - start, MADV_DONTNEED)
                return
    finally:
        for block in held:
            libc.free(block)
        if len(held) > 1:  # headers written into the chunks held on the way: their pages again
            libc.malloc_trim(0)


class IdleHeapTrimmer:
    """Tracks activity; ``maybe_trim()`` (called periodically) trims once per idle period."""

    def __init__(self, enabled: bool) -> None:
        self.libc = load_glibc() if enabled else None
        self.last_active = time.monotonic()
        self.trimmed = True
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            self.libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            self.libc.mallopt(M_ARENA_MAX, 1)

    @property
    def enabled(self) -> bool:
        return self.libc is not None

    def note_activity(self) -> None:
        self.last_active = time.monotonic()
        self.trimmed = False

    def maybe_trim(self, inflight: int) -> bool:
        """Trim if enabled, nothing runs, and nothing ran for IDLE_SECONDS since the last trim."""
        if (self.libc is None or self.trimmed or inflight
                or time.monotonic() - self.last_active < IDLE_SECONDS):
            return False
        started = time.perf_counter()
        trim_heap(self.libc)
        self.trimmed = True
        log.debug("idle: heap trimmed in %.2f ms", (time.perf_counter() - started) * 1e3)
        return True
