"""ONNX Runtime's mappings of a segment, placed so the kernel can map them 2 MiB at a time.

ORT maps each external initializer and pre-packed blob itself (``Env::MapFileIntoMemory``:
``mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, offset)``), and for a file on a
tmpfs mounted without ``huge=`` the kernel returns an address with no relation to the offset
modulo 2 MiB, so no 2 MiB page of the file can ever be mapped with one entry there
(shmcache.hugemap, condition 2). ORT has no option for the address, and refuses in-memory
external data that is not copied.

So a worker points ORT's own call to ``mmap`` at ``congruent_mmap``: the library's GOT slot
for ``mmap`` (the pointer its calls go through) is rewritten once, before the first session. A
call for 2 MiB or more of a file in /dev/shm with no address asked for gets an address congruent
to its offset (``shmcache.hugemap.map_congruent``); every other call, and any call the
placement cannot serve, goes to mmap unchanged. After the session exists, ``collapse_mapped``
installs the 2 MiB entries.

What keeps the rewrite safe:

* only a slot that currently holds libc's own ``mmap`` is rewritten, found through the
  library's JUMP_SLOT / GLOB_DAT relocations by symbol name (an x86-64 ELF; elsewhere nothing
  is done);
* the replacement returns exactly what mmap would, to the same caller, and on any exception
  calls mmap with the original arguments;
* ORT calls it only while it creates a session, with the GIL released (measured: another
  Python thread runs throughout a session's creation), so the callback taking the GIL waits at
  most for the running thread's switch interval and cannot deadlock.

``install`` says why not when it cannot; the worker logs that once and serves on 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Iterator
from typing import Any

from shmcache import hugemap
from shmcache.segment import SHM_DIR

MMAP_SYMBOLS = frozenset({"mmap", "mmap64"})
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
EM_X86_64 = 62
SHT_RELA = 4
SHT_DYNSYM = 11
PROT_READ_WRITE = 3

_MMAP_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long)
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "hook": the ctypes callback (kept alive), "shm_dev": /dev/shm's st_dev


def congruent_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int,
                   offset: int) -> int:
    """mmap, except that a mapping ORT makes of a segment lands where it can be mapped huge."""
    try:
        if not addr and length >= hugemap.HUGE_PAGE and fd >= 0 \
                and not flags & (hugemap.MAP_FIXED | hugemap.MAP_ANONYMOUS) \
                and os.fstat(fd).st_dev == _state["shm_dev"]:
            got = hugemap.map_congruent(length, prot, flags, fd, offset)
            if got != hugemap.MAP_FAILED:
                return got
    except BaseException:  # noqa: BLE001 - never let a placement problem fail ORT's mmap
        pass
    return hugemap.sys_mmap(addr, length, prot, flags, fd, offset)


def install() -> str | None:
    """Route ORT's mmap calls through ``congruent_mmap``; None when done (now or before),
    else why it could not be."""
    with _lock:
        if "hook" in _state:
            return None
        try:
            slots, path = _mmap_slots()
        except (OSError, ValueError, struct.error, ImportError) as exc:
            return f"cannot read ONNX Runtime's library: {exc}"
        if not slots:
            return f"no call to mmap found to redirect in {os.path.basename(path)}"
        _state["shm_dev"] = os.stat(SHM_DIR).st_dev
        hook = _MMAP_TYPE(congruent_mmap)
        address = ctypes.cast(hook, ctypes.c_void_p).value
        for slot in slots:
            if not _store_pointer(slot, address):
                return f"cannot write ONNX Runtime's GOT (errno {ctypes.get_errno()})"
        _state["hook"] = hook
        return None


def installed() -> bool:
    return "hook" in _state


def _mmap_slots() -> tuple[list[int], str]:
    """Addresses of the loaded ORT library's pointers to libc's mmap, and the library's path."""
    import onnxruntime.capi.onnxruntime_pybind11_state as binding

    path = os.path.realpath(binding.__file__)
    base = _load_base(path)
    if base is None:
        raise ValueError(f"{path} is not mapped in this process")
    real = ctypes.cast(hugemap.libc().mmap, ctypes.c_void_p).value
    slots = [base + offset for offset in relocation_offsets(path, MMAP_SYMBOLS)]
    return [s for s in slots if ctypes.c_void_p.from_address(s).value == real], path


def _load_base(path: str) -> int | None:
    """Where the library's file offset 0 is mapped (its load bias: shared objects link at 0)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and int(fields[2], 16) == 0 \
                    and os.path.realpath(fields[5].strip()) == path:
                return int(fields[0].split("-")[0], 16)
    return None


def _store_pointer(slot: int, value: int | None) -> bool:
    """Write a pointer into a page RELRO made read-only, and make it read-only again."""
    page = slot // hugemap.PAGE * hugemap.PAGE
    mprotect = hugemap.libc().mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if mprotect(page, hugemap.PAGE, PROT_READ_WRITE) != 0:
        return False
    ctypes.c_void_p.from_address(slot).value = value
    mprotect(page, hugemap.PAGE, hugemap.PROT_READ)
    return True


def relocation_offsets(path: str, symbols: frozenset[str]) -> list[int]:
    """r_offset of every GLOB_DAT / JUMP_SLOT relocation against one of ``symbols`` in an
    x86-64 ELF shared object (empty for any other file). Layouts: the ELF-64 header's
    e_machine at 18, e_shoff at 40, e_shentsize / e_shnum at 58; section headers of 64 bytes
    (type at 4, offset at 24, size at 32, link at 40); Elf64_Rela of 24 bytes (offset, info
    = symbol << 32 | type, addend); Elf64_Sym of 24 bytes (st_name first)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:  # 64-bit little-endian
            return []
        if struct.unpack_from("<H", ident, 18)[0] != EM_X86_64:
            return []
        (shoff,) = struct.unpack_from("<Q", ident, 40)
        shentsize, shnum = struct.unpack_from("<HH", ident, 58)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]

        def read(section: tuple[int, ...]) -> bytes:
            f.seek(section[4])
            return f.read(section[5])

        found = []
        for section in sections:
            if section[1] != SHT_RELA or section[6] >= len(sections):
                continue
            dynsym = sections[section[6]]
            if dynsym[1] != SHT_DYNSYM or dynsym[6] >= len(sections):
                continue
            names = read(sections[dynsym[6]])
            syms = read(dynsym)
            found += [r_offset for r_offset, symbol in _relocations(read(section))
                      if _symbol_name(syms, names, symbol) in symbols]
        return found


def _relocations(rela: bytes) -> Iterator[tuple[int, int]]:
    for at in range(0, len(rela) - 23, 24):
        r_offset, r_info = struct.unpack_from("<QQ", rela, at)
        if r_info & 0xFFFFFFFF in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT):
            yield r_offset, r_info >> 32


def _symbol_name(syms: bytes, names: bytes, index: int) -> str:
    at = index * 24
    if at + 4 > len(syms):
        return ""
    (start,) = struct.unpack_from("<I", syms, at)
    end = names.find(b"\0", start)
    return names[start:end].decode("utf-8", "replace") if 0 <= start < end else ""


def collapse_mapped(segment: str) -> tuple[int, int]:
    """Map this process's mappings of ``segment`` 2 MiB at a time where they are congruent
    (shmcache.hugemap step 3): (bytes now mapped huge, bytes that could have been)."""
    done = possible = 0
    for start, end, offset in _mappings_of(os.path.join(SHM_DIR, segment)):
        if (start - offset) % hugemap.HUGE_PAGE:
            continue
        a, b = hugemap.whole_huge_pages(start, end)
        if b > a:
            possible += b - a
            done += hugemap.collapse_range(a, b - a)
    return done, possible


def _mappings_of(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of ORT's mappings of ``path`` in this process: the private
    ones (the segment reader's own mapping is shared, and placed by no one)."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[1].endswith("p") and fields[5].strip() == path:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                out.append((start, end, int(fields[2], 16)))
    return out
