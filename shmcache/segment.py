"""The shared-memory weight segment: its byte layout, the writer that seals it, the reader.

One POSIX shared-memory object holds one version of one model. It lives in /dev/shm, so it is
also a file that ONNX Runtime can memory-map as "external data": the graph stored in the
segment refers to its own tensors by (segment name, offset, length).

Layout (all integers little-endian; offsets are from the start of the segment)::

    0        +--------------------------------------------------------------+
             | header, HEADER_SIZE = 256 bytes                              |
             |   0  magic            8s   b"SHMCACHE"                       |
             |   8  layout version   u16  LAYOUT_VERSION                    |
             |  10  state            u16  0 = BUILDING, 1 = SEALED          |
             |  12  flags            u32  bit 0: carries ORT pre-packed data|
             |                            bit 1: graph is ORT's optimized one|
             |  16  model name       64s  UTF-8, NUL padded                 |
             |  80  weight version   u64                                    |
             |  88  digest           32s  SHA-256, see digest_of        |
             | 120  created          i64  time.time_ns() of the creator     |
             | 128  creator pid      u32                                    |
             | 132  entry count      u32                                    |
             | 136  total size       u64  == size of the shm object         |
             | 144  table offset     u64  == 256                            |
             | 152  table length     u64  entries + name pool               |
             | 160  graph offset     u64                                    |
             | 168  graph length     u64  serialized onnx.ModelProto        |
             | 176  data offset      u64  page aligned                      |
             | 184  data length      u64                                    |
             | 192  key              32s  cache key of the data (pre-pack)  |
             | 224  source           32s  SHA-256 of the model file it was  |
             |                            built from (zero: not recorded)   |
    256      +--------------------------------------------------------------+
             | entry table: count x ENTRY_SIZE (96) bytes                   |
             |   0  offset           u64  absolute, inside the data region  |
             |   8  length           u64  bytes                             |
             |  16  name offset      u32  into the name pool                |
             |  20  name length      u16                                    |
             |  22  dtype            u8   onnx.TensorProto data type        |
             |  23  ndim             u8   <= MAX_DIMS                        |
             |  24  dims             8 x i64 (unused dims zero)             |
             |  88  kind             u8   0 = tensor, 1 = extra blob        |
             |  89  reserved         3s                                     |
             |  92  parent           u32  tensor index a blob belongs to    |
             +--------------------------------------------------------------+
             | name pool: the entries' names, UTF-8, back to back           |
    data     +--------------------------------------------------------------+
    offset   | tensor data: each entry aligned to ALIGN (64) bytes, and     |
             | entries of PAGE_ALIGN_MIN bytes or more to a 4 KiB page so   |
             | ONNX Runtime can mmap them in place                          |
             +--------------------------------------------------------------+
             | graph: onnx.ModelProto whose tensors are external data       |
             |        pointing back into this segment                       |
    total    +--------------------------------------------------------------+

"Extra blobs" (kind 1) are bytes that belong to a tensor but are not the tensor itself, such as
ONNX Runtime's pre-packed form of a MatMul weight; ``parent`` names that tensor.

The writer fills everything with the state BUILDING, computes the digest, and flips the state to
SEALED as its very last store, so a reader never accepts a half-written segment. The reader checks
every field before it trusts any offset: corruption raises ``SegmentCorrupt`` naming the field,
never an out-of-bounds read.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import posix_ipc

from shmcache.dtypes import DTYPES_BY_CODE, numpy_dtype_for
from shmcache.errors import (
    NoSpace,
    SegmentCorrupt,
    SegmentError,
    SegmentExists,
    SegmentNotFound,
)

MAGIC = b"SHMCACHE"
LAYOUT_VERSION = 1
STATE_BUILDING = 0
STATE_SEALED = 1
FLAG_PREPACKED = 1
FLAG_OPTIMIZED = 2  # ORT's optimized graph without pre-packs (a pre-packed graph is one too)

HEADER = struct.Struct("<8sHHI64sQ32sqIIQQQQQQQ32s32s")
HEADER_SIZE = HEADER.size
ENTRY = struct.Struct("<QQIHBB8qB3sI")
ENTRY_SIZE = ENTRY.size
MAX_DIMS = 8
MAX_TENSOR_NAME = 2**16 - 1  # bytes of UTF-8: the u16 name length in the table
MAX_NAME_BYTES = 64
ALIGN = 64
PAGE = mmap.PAGESIZE
PAGE_ALIGN_MIN = 64 * 1024
KIND_TENSOR = 0
KIND_BLOB = 1
NO_PARENT = 0xFFFFFFFF
STATE_OFFSET = 10
DIGEST_OFFSET = 88
SHM_DIR = "/dev/shm"
MAX_ENTRIES = 1 << 22

assert HEADER_SIZE == 256 and ENTRY_SIZE == 96


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class Header:
    """The decoded fixed header of a segment."""

    layout_version: int
    state: int
    flags: int
    model: str
    version: int
    digest: bytes
    created_ns: int
    creator_pid: int
    entry_count: int
    total_size: int
    table_offset: int
    table_length: int
    graph_offset: int
    graph_length: int
    data_offset: int
    data_length: int
    key: bytes
    source: bytes  # SHA-256 of the model file built from; zero when not recorded

    @property
    def sealed(self) -> bool:
        return self.state == STATE_SEALED

    @property
    def prepacked(self) -> bool:
        return bool(self.flags & FLAG_PREPACKED)

    @property
    def optimized(self) -> bool:
        """The graph is ORT's optimized graph, not the exporter's (initializers renamed,
        fused, reordered): publishing weights by name must use the original model."""
        return bool(self.flags & (FLAG_PREPACKED | FLAG_OPTIMIZED))


@dataclass(frozen=True)
class Entry:
    """One row of the entry table: a tensor, or an extra blob belonging to one."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    length: int
    kind: int = KIND_TENSOR
    parent: int = NO_PARENT

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype_for(self.dtype)


@dataclass
class EntrySource:
    """What the writer needs to place one entry: its metadata and a way to produce its bytes.

    ``fill`` is called with a writable memoryview of exactly ``length`` bytes inside the segment
    and must fill all of it; producing the bytes straight into the segment saves a copy.
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    length: int
    fill: Callable[[memoryview], None]
    kind: int = KIND_TENSOR
    parent: int = NO_PARENT
    align: int = 0  # 0: the default rule (a page from PAGE_ALIGN_MIN bytes, else ALIGN)


@dataclass
class Plan:
    """Where every entry goes, decided before the segment exists (so its size is known)."""

    entries: list[Entry]
    table_length: int
    data_offset: int
    data_length: int
    names_blob: bytes = field(repr=False, default=b"")

    def graph_offset(self) -> int:
        return self.data_offset + self.data_length


def plan_layout(sources: Sequence[EntrySource]) -> Plan:
    """Assign every entry an offset; names are pooled after the fixed-size table rows."""
    if len(sources) > MAX_ENTRIES:
        raise SegmentError(f"{len(sources)} tensors is more than a segment holds ({MAX_ENTRIES})")
    names = [s.name.encode("utf-8") for s in sources]
    pool = b"".join(names)
    table_length = len(sources) * ENTRY_SIZE + len(pool)
    data_offset = _align(HEADER_SIZE + table_length, PAGE)
    cursor = data_offset
    entries: list[Entry] = []
    for source, name in zip(sources, names):
        if len(source.shape) > MAX_DIMS:
            raise SegmentError(
                f"tensor {source.name!r} has {len(source.shape)} dimensions; at most {MAX_DIMS}"
            )
        if len(name) > MAX_TENSOR_NAME:  # the table's u16 name length
            raise SegmentError(f"tensor {source.name[:80]!r}... has a name of {len(name)} "
                               f"bytes; a segment holds names of at most {MAX_TENSOR_NAME}")
        cursor = _align(cursor, source.align or (PAGE if source.length >= PAGE_ALIGN_MIN else ALIGN))
        entries.append(
            Entry(source.name, source.dtype, tuple(source.shape), cursor, source.length,
                  source.kind, source.parent)
        )
        cursor += source.length
    data_length = _align(cursor, ALIGN) - data_offset
    return Plan(entries, table_length, data_offset, data_length, pool)


# --- names ------------------------------------------------------------------------------------


def shm_path(name: str) -> str:
    """The file behind a POSIX shm object; ONNX Runtime maps external data from here."""
    return os.path.join(SHM_DIR, name.lstrip("/"))


def _posix_name(name: str) -> str:
    return name if name.startswith("/") else "/" + name


def free_shm_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_room(size: int, what: str = "segment") -> None:
    """Refuse before writing when /dev/shm cannot hold ``size`` bytes (a full tmpfs SIGBUSes)."""
    free = free_shm_bytes()
    if size > free:
        raise NoSpace(
            f"{what} needs {size / 2**20:.1f} MiB in {SHM_DIR} but only {free / 2**20:.1f} MiB "
            "is free; free some shared memory or raise the tmpfs size"
        )


# --- writer -----------------------------------------------------------------------------------


class OwnedSegment:
    """A segment this process created and alone may unlink (STYLE.md principle 9)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._unlinked = False

    @property
    def path(self) -> str:
        return shm_path(self.name)

    def unlink(self) -> None:
        """Remove the name; pages are freed once the last mapping is gone. Idempotent."""
        if self._unlinked:
            return
        self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(_posix_name(self.name))
        except posix_ipc.ExistentialError:
            pass

    def take_over(self) -> None:
        """Record this process as the creator, for a daemon adopting a crashed one's segment.

        The time too: a sweep takes a creator that started after its object's time for a
        reused pid, and would unlink the segment the adopter just took over."""
        shm = posix_ipc.SharedMemory(_posix_name(self.name))
        try:
            with mmap.mmap(shm.fd, HEADER_SIZE) as mem:
                struct.pack_into("<qI", mem, 120, time.time_ns(), os.getpid())
        finally:
            shm.close_fd()


def write_segment(
    name: str,
    model: str,
    version: int,
    sources: Sequence[EntrySource],
    graph_for: Callable[[Plan], bytes],
    *,
    flags: int = 0,
    key: bytes = b"",
    source: bytes = b"",
    mode: int = 0o600,
    gid: int | None = None,
    creator_pid: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OwnedSegment:
    """Create, fill, digest and seal a segment. On any failure nothing is left behind.

    ``graph_for`` receives the final layout and returns the graph bytes, which may refer to the
    entries' offsets (that is how the stored graph points ONNX Runtime at the segment).
    ``creator_pid`` records the owner when a helper process builds on the daemon's behalf;
    ``source`` the SHA-256 of the model file (what a restarted daemon checks before adopting);
    ``progress(bytes_written, total)`` is called as entries are filled.
    """
    encoded_model = model.encode("utf-8")
    if not encoded_model or len(encoded_model) > MAX_NAME_BYTES:
        raise SegmentError(f"model name must be 1..{MAX_NAME_BYTES} UTF-8 bytes: {model!r}")
    if not 0 <= version < 2**64:
        raise SegmentError(f"weight version out of range: {version}")
    plan = plan_layout(sources)
    graph = graph_for(plan)
    total = plan.graph_offset() + len(graph)
    check_room(total, f"model {model!r} v{version} ({total / 2**20:.1f} MiB)")
    try:
        shm = posix_ipc.SharedMemory(_posix_name(name), posix_ipc.O_CREX, mode=mode, size=0)
    except posix_ipc.ExistentialError as exc:
        raise SegmentExists(f"shared memory name {name!r} is already taken") from exc
    owned = OwnedSegment(name, total)
    try:
        _reserve(shm.fd, total, mode, gid, name)
        mem = mmap.mmap(shm.fd, total)
        shm.close_fd()
        try:
            _fill(mem, plan, sources, graph, progress or (lambda done, total: None))
            _seal(mem, plan, graph, model=encoded_model, version=version, flags=flags, key=key,
                  creator=creator_pid or os.getpid(), source=source)
        finally:
            mem.close()
    except BaseException:
        if shm.fd >= 0:
            shm.close_fd()
        owned.unlink()
        raise
    return owned


def _reserve(fd: int, total: int, mode: int, gid: int | None, name: str) -> None:
    """Size the object and allocate its pages now, so a full tmpfs is an error, not a SIGBUS."""
    # shm_open applies the umask; set the mode we promised explicitly.
    os.fchmod(fd, mode)
    if gid is not None:
        os.fchown(fd, -1, gid)
    os.ftruncate(fd, total)
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        raise NoSpace(
            f"could not allocate {total / 2**20:.1f} MiB for {name!r} in {SHM_DIR} "
            f"({free_shm_bytes() / 2**20:.1f} MiB free): {exc.strerror}"
        ) from exc


def _fill(mem: mmap.mmap, plan: Plan, sources: Sequence[EntrySource], graph: bytes,
          progress: Callable[[int, int], None]) -> None:
    view = memoryview(mem)
    try:
        struct.pack_into(
            HEADER.format, mem, 0, MAGIC, LAYOUT_VERSION, STATE_BUILDING, 0, b"", 0, b"",
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"", b"",
        )
        _write_table(mem, plan)
        total = plan.graph_offset() + len(graph)
        for entry, source in zip(plan.entries, sources):
            source.fill(view[entry.offset : entry.offset + entry.length])
            progress(entry.offset + entry.length, total)
        start = plan.graph_offset()
        view[start : start + len(graph)] = graph
    finally:
        view.release()


def _write_table(mem: mmap.mmap, plan: Plan) -> None:
    name_base = 0
    for index, entry in enumerate(plan.entries):
        raw_name = entry.name.encode("utf-8")
        dims = list(entry.shape) + [0] * (MAX_DIMS - len(entry.shape))
        ENTRY.pack_into(
            mem, HEADER_SIZE + index * ENTRY_SIZE, entry.offset, entry.length, name_base,
            len(raw_name), entry.dtype, len(entry.shape), *dims, entry.kind, b"", entry.parent,
        )
        name_base += len(raw_name)
    pool_at = HEADER_SIZE + len(plan.entries) * ENTRY_SIZE
    mem[pool_at : pool_at + len(plan.names_blob)] = plan.names_blob


def _seal(
    mem: mmap.mmap, plan: Plan, graph: bytes, *, model: bytes, version: int, flags: int,
    key: bytes, creator: int, source: bytes = b"",
) -> None:
    total = plan.graph_offset() + len(graph)
    HEADER.pack_into(
        mem, 0, MAGIC, LAYOUT_VERSION, STATE_BUILDING, flags, model, version, b"",
        time.time_ns(), creator, len(plan.entries), total, HEADER_SIZE, plan.table_length,
        plan.graph_offset(), len(graph), plan.data_offset, plan.data_length, key[:32],
        source[:32],
    )
    digest = digest_of(mem, HEADER_SIZE, total, identity(mem))
    mem[DIGEST_OFFSET : DIGEST_OFFSET + 32] = digest
    # The seal is the last store: a reader that sees SEALED sees everything before it.
    struct.pack_into("<H", mem, STATE_OFFSET, STATE_SEALED)


def identity(mem: mmap.mmap | bytes) -> bytes:
    """The header as the digest covers it: every field but state, digest, creator and time.

    Those four change legitimately (sealing, adoption by a restarted daemon); every other
    field, the sizes and offsets included, is part of what the digest vouches for.
    """
    header = bytearray(mem[:HEADER_SIZE])
    for start, end in ((STATE_OFFSET, STATE_OFFSET + 2), (DIGEST_OFFSET, 132)):
        header[start:end] = bytes(end - start)
    return bytes(header)


DIGEST_CHUNK = 64 * 2**20


def digest_of(
    buffer: mmap.mmap | memoryview | bytes, start: int, end: int, prefix: bytes = b""
) -> bytes:
    """SHA-256 over ``buffer[start:end]`` in chunks, hashed on two threads.

    The digest is SHA-256 over ``prefix`` (the header, see ``identity``) and the
    concatenated SHA-256 of each 64 MiB chunk of the body: a two-level hash
    lets both cores hash at once (hashlib releases the GIL), which halves the build-time cost on
    a 256 MiB model. It is still a collision-resistant digest of the exact bytes.
    """
    view = memoryview(buffer)
    try:
        chunks = [view[at : min(at + DIGEST_CHUNK, end)] for at in range(start, end, DIGEST_CHUNK)]
        with ThreadPoolExecutor(max_workers=min(4, max(1, os.cpu_count() or 1))) as pool:
            parts = list(pool.map(lambda c: hashlib.sha256(c).digest(), chunks))
        for chunk in chunks:
            chunk.release()
    finally:
        view.release()
    outer = hashlib.sha256(prefix)
    for part in parts:
        outer.update(part)
    return outer.digest()


# --- reader -----------------------------------------------------------------------------------


class Segment:
    """A sealed segment attached read-only. Readers never unlink (STYLE.md principle 9).

    Every tensor is exposed as a read-only numpy view into the mapping: no copy. The views keep
    the mapping alive; ``close()`` releases it once no view is left.
    """

    def __init__(self, name: str, mem: mmap.mmap, header: Header, entries: list[Entry]) -> None:
        self.name = name
        self._mem = mem
        self.header = header
        self.entries = entries
        self._index = {e.name: i for i, e in enumerate(entries) if e.kind == KIND_TENSOR}

    @classmethod
    def attach(cls, name: str, *, verify: bool = False) -> Segment:
        """Map ``name`` read-only and validate it; ``verify`` also checks the digest."""
        try:
            shm = posix_ipc.SharedMemory(_posix_name(name), read_only=True)
        except posix_ipc.ExistentialError as exc:
            raise SegmentNotFound(f"no shared-memory segment named {name!r}") from exc
        except posix_ipc.PermissionsError as exc:
            raise SegmentError(f"no permission to read segment {name!r}") from exc
        try:
            size = os.fstat(shm.fd).st_size
            if size < HEADER_SIZE:
                raise SegmentCorrupt(f"{name!r}: {size} bytes is too small for a header")
            mem = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        try:
            header = parse_header(mem, size)
            entries = parse_entries(mem, header)
            segment = cls(name, mem, header, entries)
            if verify:
                segment.verify()
        except BaseException:
            mem.close()
            raise
        return segment

    @property
    def path(self) -> str:
        return shm_path(self.name)

    @property
    def size(self) -> int:
        return self.header.total_size

    def tensor_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == KIND_TENSOR]

    @property
    def holds_blobs(self) -> bool:
        """Whether the graph loads ORT's pre-packed weights: a session over it re-packs every
        one of them to check it (so is slow to create)."""
        return any(e.kind == KIND_BLOB for e in self.entries)

    def kept_mapped(self) -> list[Entry]:
        """The entries a pre-packed session keeps mapped while it serves: every blob, and
        every tensor without one (ORT unmaps a tensor once it has adopted its blob)."""
        packed = {e.parent for e in self.entries if e.kind == KIND_BLOB}
        return [e for i, e in enumerate(self.entries) if e.kind == KIND_BLOB or i not in packed]

    def view(self, entry: Entry) -> np.ndarray:
        """A read-only numpy view of one entry's bytes, with no copy."""
        if entry.kind != KIND_TENSOR:
            return np.frombuffer(self._mem, np.uint8, entry.length, entry.offset)
        dtype = entry.numpy_dtype
        count = entry.length // dtype.itemsize
        return np.frombuffer(self._mem, dtype, count, entry.offset).reshape(entry.shape)

    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.view(self.entries[self._index[name]])
        except KeyError:
            raise KeyError(f"segment {self.name!r} has no tensor {name!r}") from None

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for entry in self.tensor_entries():
            yield entry.name, self.view(entry)

    def graph_bytes(self) -> bytes:
        h = self.header
        return self._mem[h.graph_offset : h.graph_offset + h.graph_length]

    def verify(self) -> None:
        """Recompute the digest; raise ``SegmentCorrupt`` when the bytes changed."""
        actual = digest_of(self._mem, HEADER_SIZE, self.header.total_size, identity(self._mem))
        if actual != self.header.digest:
            raise SegmentCorrupt(
                f"{self.name!r}: digest mismatch (header {self.header.digest.hex()[:16]}…, "
                f"data {actual.hex()[:16]}…): the segment's bytes were modified"
            )

    def close(self) -> None:
        """Unmap, unless numpy views or ONNX Runtime still use the pages (then GC frees it)."""
        try:
            self._mem.close()
        except BufferError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_header(mem: mmap.mmap | bytes, size: int) -> Header:
    """Decode and bounds-check the header against the real object size."""
    fields = HEADER.unpack_from(mem, 0)
    magic, layout, state, flags, raw_model = fields[:5]
    if magic != MAGIC:
        raise SegmentCorrupt(f"bad magic {magic!r}: not a shmcache segment")
    if layout != LAYOUT_VERSION:
        raise SegmentCorrupt(f"layout version {layout}, this shmcache reads {LAYOUT_VERSION}")
    if state != STATE_SEALED:
        what = "still being built or abandoned" if state == STATE_BUILDING else f"state {state}"
        raise SegmentCorrupt(f"segment is not sealed ({what})")
    try:
        model = raw_model.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SegmentCorrupt("model name is not UTF-8") from exc
    header = Header(layout, state, flags, model, *fields[5:19])
    _check_header_bounds(header, size)
    return header


def _check_header_bounds(h: Header, size: int) -> None:
    if h.total_size != size:
        raise SegmentCorrupt(f"total size {h.total_size} != object size {size} (truncated?)")
    if h.table_offset != HEADER_SIZE:
        raise SegmentCorrupt(f"table offset {h.table_offset}, expected {HEADER_SIZE}")
    if h.entry_count > MAX_ENTRIES or h.entry_count * ENTRY_SIZE > h.table_length:
        raise SegmentCorrupt(f"entry count {h.entry_count} does not fit table length")
    table_end = h.table_offset + h.table_length
    regions = [
        ("table", h.table_offset, table_end),
        ("data", h.data_offset, h.data_offset + h.data_length),
        ("graph", h.graph_offset, h.graph_offset + h.graph_length),
    ]
    for what, start, end in regions:
        if not 0 <= start <= end <= size:
            raise SegmentCorrupt(f"{what} region [{start}, {end}) is outside the {size} bytes")
    if h.data_offset < table_end:
        raise SegmentCorrupt("data region overlaps the entry table")
    if h.graph_offset < h.data_offset + h.data_length:
        raise SegmentCorrupt("graph overlaps the data region")
    if h.graph_length == 0:
        raise SegmentCorrupt("segment holds no graph")


def parse_entries(mem: mmap.mmap | bytes, h: Header) -> list[Entry]:
    """Decode the entry table, checking each row against the data region and its neighbours."""
    pool_start = h.table_offset + h.entry_count * ENTRY_SIZE
    pool_length = h.table_offset + h.table_length - pool_start
    data_end = h.data_offset + h.data_length
    entries = [
        _parse_entry(mem, h, index, pool_start, pool_length, data_end)
        for index in range(h.entry_count)
    ]
    _check_no_overlap(entries)
    _check_parents(entries)
    return entries


def _parse_entry(
    mem: mmap.mmap | bytes, h: Header, index: int, pool_start: int, pool_length: int,
    data_end: int,
) -> Entry:
    row = ENTRY.unpack_from(mem, h.table_offset + index * ENTRY_SIZE)
    offset, length, name_at, name_len, dtype, ndim = row[:6]
    dims, kind, parent = row[6:14], row[14], row[16]
    where = f"entry {index}"
    if name_at + name_len > pool_length:
        raise SegmentCorrupt(f"{where}: name outside the name pool")
    try:
        name = bytes(mem[pool_start + name_at : pool_start + name_at + name_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SegmentCorrupt(f"{where}: name is not UTF-8") from exc
    where = f"entry {index} ({name!r})"
    if kind not in (KIND_TENSOR, KIND_BLOB):
        raise SegmentCorrupt(f"{where}: unknown kind {kind}")
    if not h.data_offset <= offset <= offset + length <= data_end:
        raise SegmentCorrupt(f"{where}: bytes [{offset}, {offset + length}) outside data region")
    if ndim > MAX_DIMS or any(d < 0 for d in dims):
        raise SegmentCorrupt(f"{where}: bad shape (ndim {ndim}, dims {dims})")
    shape = tuple(dims[:ndim])
    if kind == KIND_TENSOR:
        if dtype not in DTYPES_BY_CODE:
            raise SegmentCorrupt(f"{where}: unknown dtype code {dtype}")
        expected = math.prod(shape) * numpy_dtype_for(dtype).itemsize
        if expected != length:
            raise SegmentCorrupt(f"{where}: shape {shape} needs {expected} bytes, has {length}")
    return Entry(name, dtype, shape, offset, length, kind, parent)


def _check_no_overlap(entries: list[Entry]) -> None:
    spans = sorted((e.offset, e.offset + e.length, e.name) for e in entries if e.length)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise SegmentCorrupt(f"entries {name!r} and {other!r} overlap")


def _check_parents(entries: list[Entry]) -> None:
    for entry in entries:
        if entry.kind == KIND_BLOB and (
            entry.parent >= len(entries) or entries[entry.parent].kind != KIND_TENSOR
        ):
            raise SegmentCorrupt(f"blob {entry.name!r} names a missing parent {entry.parent}")


__all__ = [
    "Entry",
    "EntrySource",
    "Header",
    "OwnedSegment",
    "Plan",
    "Segment",
    "write_segment",
]
