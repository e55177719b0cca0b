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
* the slot's page gets back the permissions it had (read-only under full RELRO);
* on any exception inside it, it fails the call (MAP_FAILED, ENOMEM) rather than return
  garbage, and errno reaches ORT as mmap left it (the callback type uses errno);
* ORT calls it while it creates a session, with the GIL released (measured: another Python
  thread ran throughout a session's creation), so taking the GIL costs at most a switch
  interval (5 ms) a call: a few calls for a model with a few large tensors, more for one with
  thousands. The worker pauses the cyclic garbage collector while it creates a session
  (``gc_paused``), so no finalizer (another session's, say) runs inside ORT's mmap.

``install`` says why not when it cannot, and never raises; the worker logs that once and
serves on 4 KiB pages.

What is read of the library file (ELF-64, little-endian, x86-64; offsets in bytes)::

    file header   0 magic "\x7fELF", 4 class (2 = 64-bit), 5 data (1 = little-endian),
                  18 e_machine u16 (62 = x86-64), 32 e_phoff u64, 40 e_shoff u64,
                  54 e_phentsize u16, 56 e_phnum u16, 58 e_shentsize u16, 60 e_shnum u16
    program hdr   0 p_type u32 (1 = PT_LOAD), 8 p_offset u64, 16 p_vaddr u64
    section hdr   4 sh_type u32 (4 = RELA, 11 = DYNSYM), 24 sh_offset u64, 32 sh_size u64,
                  40 sh_link u32 (RELA -> its symbol table, DYNSYM -> its string table)
    Elf64_Rela    0 r_offset u64 (the slot, from the load bias), 8 r_info u64
                  (symbol index << 32 | type: 6 = GLOB_DAT, 7 = JUMP_SLOT), 16 r_addend
    Elf64_Sym     0 st_name u32 (into the string table), 24 bytes each
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, NamedTuple

from shmcache import hugemap, libc
from shmcache.segment import SHM_DIR

MMAP_SYMBOLS = frozenset({"mmap", "mmap64"})
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
EM_X86_64 = 62
SHT_RELA = 4
SHT_DYNSYM = 11
PROT_READ_WRITE = 3

# use_errno: errno as the inner mmap left it reaches ORT (ctypes keeps a private copy).
_MMAP_TYPE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long, use_errno=True)
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "hook": the ctypes callback (kept alive), "shm_dev": /dev/shm's st_dev


def congruent_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int,
                   offset: int) -> int:
    """mmap, except that a mapping ORT makes of a segment lands where it can be mapped huge.
    Never raises: a ctypes callback that raises returns whatever its return slot held."""
    try:
        if not addr and length >= hugemap.HUGE_PAGE and fd >= 0 \
                and not flags & (hugemap.MAP_FIXED | hugemap.MAP_ANONYMOUS):
            try:
                if os.fstat(fd).st_dev == _state.get("shm_dev"):
                    got = hugemap.map_congruent(length, prot, flags, fd, offset)
                    if got != libc.MAP_FAILED:
                        return got
            except Exception:  # noqa: BLE001 - not placed, then: mapped as asked
                pass
        return libc.sys_mmap(addr, length, prot, flags, fd, offset)
    except BaseException:  # noqa: BLE001 - fail this one call, cleanly
        ctypes.set_errno(errno.ENOMEM)
        return libc.MAP_FAILED


def install() -> str | None:
    """Route ORT's mmap calls through ``congruent_mmap``; None when done (now or before),
    else why it could not be. Never raises."""
    with _lock:
        if "hook" in _state:
            return None
        try:
            return _install()
        except Exception as exc:  # noqa: BLE001 - a worker serves on 4 KiB pages instead
            return f"{type(exc).__name__}: {exc}"


def _install() -> str | None:
    slots, path = _mmap_slots()
    if not slots:
        return f"no pointer to libc's mmap found in {os.path.basename(path)}"
    _state["shm_dev"] = os.stat(SHM_DIR).st_dev
    hook = _MMAP_TYPE(congruent_mmap)
    _state["hook"] = hook  # alive for good before any slot points at it
    address = ctypes.cast(hook, ctypes.c_void_p).value
    real = ctypes.cast(libc.libc().mmap, ctypes.c_void_p).value
    written: list[int] = []
    for slot in slots:
        if not _store_pointer(slot, address):
            why = f"cannot write ONNX Runtime's GOT (errno {ctypes.get_errno()})"
            for done in written:  # back to libc's mmap: all or nothing
                _store_pointer(done, real)
            del _state["hook"]  # nothing points at it any more
            return why
        written.append(slot)
    return None


def installed() -> bool:
    return "hook" in _state


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic collection inside the block (nested and concurrent blocks share
    one pause): a collection inside ORT's mmap callback could run the finalizer of another
    session while this one is being initialized."""
    with _lock:
        _state["gc_holders"] = _state.get("gc_holders", 0) + 1
        if _state["gc_holders"] == 1:
            _state["gc_was_enabled"] = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _state["gc_holders"] -= 1
            if _state["gc_holders"] == 0 and _state.pop("gc_was_enabled", True):
                gc.enable()


def _mmap_slots() -> tuple[list[int], str]:
    """Addresses of the loaded ORT library's pointers to libc's mmap, and the library's path.
    Only addresses inside the library's own mappings are read."""
    import onnxruntime.capi.onnxruntime_pybind11_state as binding

    path = os.path.realpath(binding.__file__)
    mapped = _mappings_of_file(path)
    first_load = first_load_vaddr(path)
    start0 = next((m.start for m in mapped if m.offset == 0), None)
    if start0 is None or first_load is None:
        raise ValueError(f"{path} is not mapped in this process, or not an ELF we read")
    base = start0 - first_load // hugemap.PAGE * hugemap.PAGE
    real = ctypes.cast(libc.libc().mmap, ctypes.c_void_p).value
    slots = []
    for offset in relocation_offsets(path, MMAP_SYMBOLS):
        slot = base + offset
        if any(m.start <= slot and slot + 8 <= m.end for m in mapped) \
                and ctypes.c_void_p.from_address(slot).value == real:
            slots.append(slot)
    return slots, path


class Mapping(NamedTuple):
    start: int
    end: int
    perms: str  # "r-xp", "rw-s", ...
    offset: int
    path: str  # "" for an anonymous mapping


def _maps() -> list[Mapping]:
    """Every mapping of this process, from /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            start, end = (int(v, 16) for v in fields[0].split("-"))
            path = fields[5].strip() if len(fields) == 6 else ""
            out.append(Mapping(start, end, fields[1], int(fields[2], 16), path))
    return out


def _mappings_of_file(path: str) -> list[Mapping]:
    """Every mapping of the file ``path`` (a resolved path) here."""
    name = os.path.basename(path)
    return [m for m in _maps()
            if os.path.basename(m.path) == name and os.path.realpath(m.path) == path]


def _page_protection(page: int) -> int | None:
    """PROT_* of the mapping holding ``page``."""
    for m in _maps():
        if m.start <= page < m.end:
            return (hugemap.PROT_READ if m.perms[0] == "r" else 0) \
                | (2 if m.perms[1] == "w" else 0) | (4 if m.perms[2] == "x" else 0)
    return None


def _store_pointer(slot: int, value: int | None) -> bool:
    """Write a pointer into a page that RELRO may have made read-only, and give the page back
    the permissions it had."""
    page = slot // hugemap.PAGE * hugemap.PAGE
    had = _page_protection(page)
    if had is None:
        return False
    mprotect = libc.libc().mprotect
    if had != had | PROT_READ_WRITE and mprotect(page, hugemap.PAGE, had | PROT_READ_WRITE) != 0:
        return False
    ctypes.c_void_p.from_address(slot).value = value
    if had != had | PROT_READ_WRITE:
        mprotect(page, hugemap.PAGE, had)
    return True


def _elf64_header(f: BinaryIO) -> bytes | None:
    """The 64-byte file header of a 64-bit little-endian ELF, None for any other file."""
    ident = f.read(64)
    if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        return None
    return ident


def first_load_vaddr(path: str) -> int | None:
    """p_vaddr of the PT_LOAD segment at file offset 0 of a 64-bit little-endian ELF (a shared
    object's load bias is where that segment is mapped minus this). Program headers: e_phoff
    at 32, e_phentsize / e_phnum at 54; each p_type (4), p_flags (4), p_offset, p_vaddr..."""
    try:
        with open(path, "rb") as f:
            ident = _elf64_header(f)
            if ident is None:
                return None
            (phoff,) = struct.unpack_from("<Q", ident, 32)
            phentsize, phnum = struct.unpack_from("<HH", ident, 54)
            if phentsize < 56 or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(len(table) // phentsize):
                p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", table, i * phentsize)
                if p_type == 1 and p_offset == 0:  # PT_LOAD
                    return int(p_vaddr)
    except (OSError, ValueError, OverflowError, struct.error):
        return None
    return None


def relocation_offsets(path: str, symbols: frozenset[str]) -> list[int]:
    """r_offset of every GLOB_DAT / JUMP_SLOT relocation against one of ``symbols`` in an
    x86-64 ELF shared object (empty for any other file). Layouts: the ELF-64 header's
    e_machine at 18, e_shoff at 40, e_shentsize / e_shnum at 58; section headers of 64 bytes
    (type at 4, offset at 24, size at 32, link at 40); Elf64_Rela of 24 bytes (offset, info
    = symbol << 32 | type, addend); Elf64_Sym of 24 bytes (st_name first)."""
    try:
        return _relocation_offsets(path, symbols)
    except (OSError, ValueError, OverflowError, MemoryError, IndexError, struct.error):
        return []  # not an ELF we can read: nothing to redirect


def _relocation_offsets(path: str, symbols: frozenset[str]) -> list[int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        ident = _elf64_header(f)
        if ident is None or struct.unpack_from("<H", ident, 18)[0] != EM_X86_64:
            return []
        (shoff,) = struct.unpack_from("<Q", ident, 40)
        shentsize, shnum = struct.unpack_from("<HH", ident, 58)
        if shentsize < 64 or shoff + shentsize * shnum > size:
            return []
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]

        def read(section: tuple[int, ...]) -> bytes:
            if section[4] + section[5] > size:
                raise ValueError("section beyond the end of the file")
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
    (shmcache.hugemap step 3): (bytes now mapped huge, bytes of mappings of 2 MiB or more,
    congruent or not: a mapping the redirect did not place shows as missed)."""
    done = possible = 0
    for start, end, offset in _mappings_of(os.path.join(SHM_DIR, segment)):
        if end - start < hugemap.HUGE_PAGE:
            continue
        if (start - offset) % hugemap.HUGE_PAGE:  # not placed (a bypassed call): counted, missed
            possible += (end - start) // hugemap.HUGE_PAGE * hugemap.HUGE_PAGE
            continue
        a, b = hugemap.whole_huge_pages(start, end)
        possible += max(0, b - a)
        done += hugemap.collapse_range(start, end - start)
    return done, possible


def _mappings_of(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of ORT's mappings of ``path`` in this process: the private
    ones (the segment reader's own mapping is shared, and placed by no one)."""
    return [(m.start, m.end, m.offset) for m in _maps() if m.perms.endswith("p") and m.path == path]
