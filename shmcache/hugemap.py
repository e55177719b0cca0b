"""Huge pages for the segment's weights: 2 MiB page-cache folios, mapped 2 MiB at a time.

A worker's run of the 256 MiB MLP streams every pre-packed weight through the CPU. On 4 KiB
pages that is 65 536 TLB misses a run, each a page walk (two-dimensional under a hypervisor);
mapped with 2 MiB entries it is 128. Measured on this project's 2-core VM, the same session on
the same segment file, alternating with a default in-process session (benchmarks/NOTES-prepack.md,
"Huge pages for the weights"): the run takes 0.94x the in-process one's time with 2 MiB
mappings, 0.97x without; through the daemon, p50 per call 2-4 % lower (four A/B runs).

Two things have to hold for the kernel to map a range of a tmpfs file with one 2 MiB entry:

1. The page cache holds that range as one 2 MiB folio. /dev/shm is usually mounted without
   ``huge=`` (and ``shmem_enabled`` says ``never``), so writes make 4 KiB pages. MADV_COLLAPSE
   (Linux 6.1) turns a mapped range into 2 MiB folios whatever those settings say, and the folios
   stay in the page cache after the mapping goes: ``collapse_file`` does this once per segment,
   in the builder, for the entries workers keep mapped.
2. The mapping's address and the file offset are congruent modulo 2 MiB. The kernel only aligns
   tmpfs mappings for mounts with ``huge=``; ONNX Runtime maps its external data itself, at
   whatever address ``mmap`` returns (worker.aligned_maps makes that address congruent).

Then MADV_COLLAPSE on the worker's own mapping installs the 2 MiB entries (``collapse_range``;
the folios being huge already, this costs microseconds). Nothing here changes what is stored or
how much: a collapse moves 512 pages into one folio of the same size, and only whole 2 MiB
stretches inside one entry are collapsed, never the pages between entries.

A process with ``PR_SET_THP_DISABLE`` (the daemon's, see shmcache.hugepages) is refused
MADV_COLLAPSE: callers collapse inside ``hugepages.transient_huge_pages()``. Where the kernel
refuses (older than 6.1, THP compiled out, ``shmem_enabled`` = ``deny``) everything here returns
0 and the weights stay on 4 KiB pages, as before.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable

from shmcache.libc import MAP_FAILED, libc, sys_mmap

HUGE_PAGE = 2 * 1024 * 1024  # x86-64 and arm64 (4 KiB base pages) PMD size
PAGE = mmap.PAGESIZE
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
PROT_NONE = 0
PROT_READ = 1
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000


def round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def map_congruent(length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """Map ``fd`` at an address congruent to ``offset`` modulo HUGE_PAGE: reserve 2 MiB more
    address space than needed, map over the right part of it, give back the rest. MAP_FAILED
    when the kernel refuses (the caller maps as it would have)."""
    span = length + HUGE_PAGE
    reserved = sys_mmap(None, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if reserved == MAP_FAILED:
        return MAP_FAILED
    target = reserved + (offset - reserved) % HUGE_PAGE
    got = sys_mmap(target, length, prot, flags | MAP_FIXED, fd, offset)
    end = target + round_up(length, PAGE)
    # Around the mapping (or the failed attempt) the reservation goes. After a failure the
    # middle stays reserved: before 6.12 a failed MAP_FIXED may already have unmapped it, and
    # another thread's mapping may sit there now. Address space only; nothing is committed.
    if target > reserved:
        libc().munmap(reserved, target - reserved)
    if reserved + span > end:
        libc().munmap(end, reserved + span - end)
    return got


def whole_huge_pages(start: int, end: int) -> tuple[int, int]:
    """The largest [a, b) inside [start, end) with a and b multiples of HUGE_PAGE (a >= b: none)."""
    return round_up(start, HUGE_PAGE), end // HUGE_PAGE * HUGE_PAGE


def collapse_range(addr: int, length: int) -> int:
    """MADV_COLLAPSE every whole 2 MiB page of a mapping; the bytes now mapped huge (0 when
    the kernel refuses: too old, THP off for this process, memory too fragmented)."""
    a, b = whole_huge_pages(addr, addr + length)
    done = 0
    for page in range(a, b, HUGE_PAGE):  # one at a time: a refused one does not hide the rest
        if libc().madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0:
            done += HUGE_PAGE
        elif ctypes.get_errno() == 22:  # EINVAL: not supported here at all; stop asking
            break
    return done


def collapse_file(path: str, ranges: Iterable[tuple[int, int]]) -> int:
    """Have the page cache of a tmpfs file hold every whole 2 MiB stretch of each
    ``(offset, length)`` range as one folio (step 1 above); the bytes collapsed. The file is
    mapped read-only, shared, at an address congruent to offset 0, and unmapped again."""
    ranges = [(o, n) for o, n in ranges if n >= HUGE_PAGE]
    if not ranges:
        return 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        base = map_congruent(size, PROT_READ, MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            return 0
        try:
            done = 0
            for offset, length in ranges:  # base is a multiple of HUGE_PAGE
                start, end = max(0, offset), min(size, offset + length)
                done += collapse_range(base + start, max(0, end - start))
            return done
        finally:
            libc().munmap(base, size)
    finally:
        os.close(fd)
