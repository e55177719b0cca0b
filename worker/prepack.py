r"""Pre-pack a model's weights once, and move the result into a segment.

One job: turn an ONNX model into (optimized graph, data file holding original *and* pre-packed
weights) with a single ONNX Runtime session, then describe and relocate that data so the segment
writer can lay it out in shared memory and workers can memory-map it from /dev/shm.

Why: CPU kernels (MatMul/Gemm via MLAS) re-layout constant weights into private buffers at session
creation ("pre-packing"), so every worker would hold its own copy. ORT can save those packed
buffers next to the weights (ORT PRs 22256, 23069) and, on load, memory-maps both. See
benchmarks/NOTES-prepack.md for the measurements this module is built on.

How ORT writes an external initializer (``TensorProto.external_data``, key → value)::

    location     "opt.data"            file name, relative to the model's folder (or to
                                       session.model_external_initializers_file_folder_path)
    offset       "134234112"           byte offset of the tensor's raw little-endian data
    length       "67108864"            byte length (== numel * itemsize)
    prepacked_0  "FusedGemm+1433…608|201342976;67108864;0"
    prepacked_1  ...                   one entry per kernel key that pre-packed this tensor

    prepacked_<k> value:

        <kernel key> | <offset>;<length>;<checksum> [ | <offset>;<length>;<checksum> ... ]
        \__________/   \________________________/
         op type + "+"  one group per packed buffer (blob) of that kernel, in the order the
         + 64-bit hash  kernel produced them; offset/length are bytes in the *same* file as
         of the packed  ``location``; checksum is always "0" and not validated (ORT 1.32).
         content        <k> counts keys per tensor (0, 1, ...); ORT only checks the prefix.

At load ORT maps each original tensor, runs the kernel's PrePack on it, hashes the result and
adopts the mapped blob only when ``op+hash`` equals the saved kernel key; then it unmaps the
original. So the originals must be present in the segment (holes give wrong outputs), and a blob
made on another CPU or ORT is ignored (private re-pack: memory lost, results still right).
ORT refuses any other external_data key ("model format error!"), so relocation rewrites values
and never adds keys. Alignment: ORT maps [offset rounded down to a page, offset + length), so any
offset works (blobs at page+4 ran bit-identical at full speed); we still ask for page alignment
for entries of at least a page, so each owns its pages, and 64 bytes (a cache line) below that.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from shmcache.candidate import Signature, signature_of
from shmcache.dtypes import numpy_dtype_for
from shmcache.errors import ModelError
from shmcache.model import model_digest as file_digest
from shmcache.segment import (
    FLAG_OPTIMIZED,
    FLAG_PREPACKED,
    KIND_BLOB,
    EntrySource,
    OwnedSegment,
    Plan,
    write_segment,
)

PAGE = 4096
SMALL_ALIGN = 64

# Graph optimization levels a pre-pack can be made at. "all" adds the NCHWc layout transformer,
# whose output is CPU specific (ORT warns so when saving).
OPT_LEVELS = ("basic", "extended", "all")

# /proc/cpuinfo flags that change which MLAS kernels run, hence the bytes of a packed buffer or
# the layout a graph transformer picks (NCHWc block size is 8 on AVX2, 16 on AVX-512).
# x86-64 then aarch64; flags absent from the host are simply absent from the key.
_RELEVANT_CPU_FLAGS = frozenset(
    {
        "sse3", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
        "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni", "avx512vnni",
        "avx512_bf16", "avx512_fp16", "avx_vnni", "avxvnni", "avx_vnni_int8", "avxvnniint8",
        "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
        "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",
    }
)  # fmt: skip

EntryKind = Literal["tensor", "prepacked"]
# (initializer name, kernel key or "" for the tensor's own bytes, blob index within that key)
EntryId = tuple[str, str, int]


@dataclass(frozen=True)
class ExternalEntry:
    """One byte range of the data file: an initializer's data or one pre-packed blob."""

    tensor: str
    kind: EntryKind
    key: str  # kernel key ("FusedGemm+<hash>") for blobs, "" for tensors
    index: int  # blob index within ``key``; 0 for tensors
    location: str
    offset: int
    length: int
    alignment: int

    @property
    def id(self) -> EntryId:
        return (self.tensor, self.key, self.index)


@dataclass(frozen=True)
class PrepackOutput:
    graph_path: Path
    data_path: Path
    key: str
    packed: bool = True  # False: the optimized graph only (--no-prepack)


# --- cache key ----------------------------------------------------------------------------------


def cpu_flags() -> str:
    """The sorted, space-separated CPU feature flags that affect pre-packed layouts."""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
            break  # every core of one host reports the same flags
    return " ".join(sorted(flags & _RELEVANT_CPU_FLAGS))


def prepack_key(model_digest: str, opt_level: str, packed: bool = True) -> str:
    """Hex digest naming one pre-pack: valid only for this model, ORT build, CPU and level.

    The intra-op thread count is deliberately absent: packed buffers do not depend on it
    (NOTES-prepack.md, question 7).
    """
    import onnxruntime as ort  # imported late: the supervisor imports this module, never ORT

    _check_level(opt_level)
    h = hashlib.sha256()
    for part in (
        # v2: graphs saved by v1 could ask for inputs their model has not (keep_served_inputs)
        "shmcache-prepack-v2" if packed else "shmcache-optimized-v2",
        model_digest,
        ort.__version__,
        platform.machine(),
        cpu_flags(),
        opt_level,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _check_level(opt_level: str) -> None:
    if opt_level not in OPT_LEVELS:
        raise ValueError(f"opt_level must be one of {OPT_LEVELS}, not {opt_level!r}")


# --- producing a pre-pack -----------------------------------------------------------------------


def run_prepack(
    model_path: Path, out_dir: Path, opt_level: str = "extended", model_digest: str | None = None,
    packed: bool = True,
) -> PrepackOutput:
    """Create ONE session over ``model_path`` that saves its optimized graph and pre-packed data.

    ``packed=False`` (``--no-prepack`` mode): the optimized graph only, made with pre-packing
    off. Level "all" rewrites Conv weights into NCHWc blocks; in the saved graph they are
    ordinary initializers, shared from the segment, where a session over the original graph
    builds them privately in every worker (14 MiB per worker on benchmarks/memory.py's Conv).

    Runs ONNX Runtime in the calling process: call it through ``python -m worker.prepack`` from
    a process that will fork (STYLE.md principle 5). ``model_digest`` defaults to the SHA-256 of
    the model file (external data of the *source* model is not hashed: pass a digest that covers
    it if the model has any).
    """
    import onnxruntime as ort

    _check_level(opt_level)
    if model_digest is None:
        model_digest = file_digest(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_path = out_dir / "model.opt.onnx"
    data_path = out_dir / "model.opt.data"
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # the level-"all" warning is expected: the key names the CPU
    so.optimized_model_filepath = str(graph_path)
    # The data file name is relative to the optimized graph's folder.
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", data_path.name
    )
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    if packed:
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    else:
        so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind types; surface one typed error
        raise ModelError(f"{model_path}: {exc}") from exc
    if not graph_path.exists():
        raise ModelError(f"{model_path}: ORT wrote no optimized graph")
    if not data_path.exists():
        # A model with no initializer of >= 64 bytes: nothing external, nothing to share.
        data_path.write_bytes(b"")
    keep_served_inputs(graph_path, model_path)
    return PrepackOutput(graph_path, data_path, prepack_key(model_digest, opt_level, packed),
                         packed)


def keep_served_inputs(graph_path: Path, model_path: Path) -> None:
    """Make the optimized graph ask for the inputs its model asks for, or raise ModelError.

    In a model of IR version < 4 every initializer is listed as a graph input too, and ORT
    takes them for constants: its optimizer merges equal ones (ConstantSharing) and folds
    others, and the saved graph still lists the names it dropped as inputs, now with no
    initializer behind them. A session over it would require them from every caller
    (onnx's light_resnet50 asked for 212 such inputs). Names that no node reads any more are
    taken out of the inputs; any other difference from the model's own inputs and outputs
    raises, and the builder serves the model's plain weights instead.
    """
    from shmcache.skeleton import graph_skeleton

    original = signature_of(onnx.ModelProto.FromString(graph_skeleton(model_path)))
    optimized = onnx.load(str(graph_path), load_external_data=False)
    graph = optimized.graph
    constants = {t.name for t in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer}
    wanted = {v.name for v in original.inputs}
    dropped = [v for v in graph.input if v.name not in constants and v.name not in wanted]
    if dropped:
        read = {name for g in _graphs(graph) for node in g.node for name in node.input}
        still_read = sorted(v.name for v in dropped if v.name in read)
        if still_read:
            raise ModelError(f"{model_path}: ORT's optimized graph reads {len(still_read)} "
                             f"input(s) the model does not have ({', '.join(still_read[:5])})")
        for v in dropped:
            graph.input.remove(v)
        graph_path.write_bytes(optimized.SerializeToString())
    served = signature_of(optimized)

    def names(sig: Signature) -> tuple[list[str], list[str]]:
        return [v.name for v in sig.inputs], [v.name for v in sig.outputs]

    if names(served) != names(original):
        (ins, outs), (want_ins, want_outs) = names(served), names(original)
        raise ModelError(f"{model_path}: ORT's optimized graph has inputs {ins} and outputs "
                         f"{outs}; the model has {want_ins} and {want_outs}")


# --- reading and relocating external data -------------------------------------------------------


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto whose data is external: initializers, sparse parts, attribute tensors."""
    for graph in _graphs(model.graph):
        candidates: list[onnx.TensorProto] = list(graph.initializer)
        for sparse in graph.sparse_initializer:
            candidates += [sparse.values, sparse.indices]
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    candidates.append(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    candidates += list(attr.tensors)
        for t in candidates:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                yield t


def _alignment(length: int) -> int:
    return PAGE if length >= PAGE else SMALL_ALIGN


def _parse_prepacked(tensor: str, value: str) -> tuple[str, list[tuple[int, int, str]]]:
    """``key|off;len;sum|off;len;sum`` → (key, [(off, len, sum), ...])."""
    key, *groups = value.split("|")
    blobs = []
    for group in groups:
        fields = group.split(";")
        if len(fields) != 3 or not key:
            raise ModelError(f"initializer {tensor!r}: bad pre-packed entry {value!r}")
        blobs.append((int(fields[0]), int(fields[1]), fields[2]))
    return key, blobs


def read_external_entries(model: onnx.ModelProto) -> list[ExternalEntry]:
    """Every external byte range the model refers to, tensors first, in file order per kind.

    Pure over the ModelProto (the data file is not opened). Raises ModelError on a malformed
    entry or on two different ranges claiming the same id.
    """
    entries: dict[EntryId, ExternalEntry] = {}

    def add(e: ExternalEntry) -> None:
        old = entries.get(e.id)
        if old is not None and (old.offset, old.length, old.location) != (
            e.offset,
            e.length,
            e.location,
        ):
            raise ModelError(f"two external ranges for {e.id}")
        entries[e.id] = e

    for t in _external_tensors(model):
        info = {kv.key: kv.value for kv in t.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelError(f"initializer {t.name!r}: external data without a location")
        length = int(info.get("length") or 0)
        if length == 0:
            raise ModelError(f"initializer {t.name!r}: external data without a length")
        offset = int(info.get("offset") or 0)
        add(ExternalEntry(t.name, "tensor", "", 0, location, offset, length, _alignment(length)))
        for kv in t.external_data:
            if kv.key.startswith("prepacked"):
                key, blobs = _parse_prepacked(t.name, kv.value)
                for i, (off, ln, _sum) in enumerate(blobs):
                    add(ExternalEntry(t.name, "prepacked", key, i, location, off, ln, _alignment(ln)))
    ordered = list(entries.values())
    ordered.sort(key=lambda e: (e.kind != "tensor", e.offset))
    return ordered


def relocate_external_data(
    model: onnx.ModelProto, location: str, offsets: Mapping[EntryId, int]
) -> None:
    """Point every external range of ``model`` at ``location``, at the offsets given, in place.

    ``offsets`` maps each ``ExternalEntry.id`` (from ``read_external_entries``) to its new byte
    offset in the file ``location``. Every entry must be present and aligned to its
    ``alignment``: a missing one would silently keep pointing into the old file. Lengths,
    kernel keys and checksums are kept; key order within ``external_data`` is kept.
    """
    wanted = {e.id: e for e in read_external_entries(model)}
    missing = wanted.keys() - offsets.keys()
    if missing:
        raise ModelError(f"no new offset for {sorted(missing)[:3]} ({len(missing)} missing)")
    for eid, e in wanted.items():
        if offsets[eid] < 0 or offsets[eid] % e.alignment:
            raise ModelError(f"offset {offsets[eid]} of {eid} is not {e.alignment}-aligned")
    for t in _external_tensors(model):
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
            elif kv.key == "offset":
                kv.value = str(offsets[(t.name, "", 0)])
            elif kv.key.startswith("prepacked"):
                key, blobs = _parse_prepacked(t.name, kv.value)
                groups = [f"{offsets[(t.name, key, i)]};{ln};{s}" for i, (_, ln, s) in enumerate(blobs)]
                kv.value = "|".join([key, *groups])
        if not any(kv.key == "offset" for kv in t.external_data):
            new = t.external_data.add()
            new.key, new.value = "offset", str(offsets[(t.name, "", 0)])


# --- into a segment -----------------------------------------------------------------------------


def segment_sources(graph: onnx.ModelProto, data_path: Path) -> tuple[list[ExternalEntry], list[EntrySource]]:
    """One segment entry per external range: tensors (typed) first, then their blobs.

    Each ``fill`` reads its bytes from the pre-pack's data file straight into the segment.
    """
    entries = read_external_entries(graph)
    tensors = {t.name: t for t in _external_tensors(graph)}
    index = {e.tensor: i for i, e in enumerate(entries) if e.kind == "tensor"}

    def reader(offset: int, length: int) -> Callable[[memoryview], None]:
        def fill(dest: memoryview) -> None:
            with data_path.open("rb") as f:
                f.seek(offset)
                if f.readinto(dest) != length:
                    raise ModelError(f"{data_path}: truncated pre-pack data")
        return fill

    sources = []
    for e in entries:
        if e.kind == "tensor":
            t = tensors[e.tensor]
            numpy_dtype_for(t.data_type)  # refused here, by name: the reader would not take it
            sources.append(EntrySource(e.tensor, t.data_type, tuple(int(d) for d in t.dims),
                                       e.length, reader(e.offset, e.length), align=e.alignment))
        else:
            sources.append(EntrySource(f"{e.tensor}|{e.key}|{e.index}", 0, (), e.length,
                                       reader(e.offset, e.length), kind=KIND_BLOB,
                                       parent=index[e.tensor], align=e.alignment))
    return entries, sources


def write_prepacked_segment(
    out: PrepackOutput, *, name: str, model_name: str, version: int, mode: int = 0o600,
    gid: int | None = None, creator_pid: int | None = None,
    progress: Callable[[int, int], None] | None = None, source: bytes = b"",
) -> OwnedSegment:
    """A segment holding the optimized graph, the original weights and their pre-packed blobs
    (none when ``out.packed`` is false), with every external reference relocated into the
    segment file itself."""
    graph = onnx.load(str(out.graph_path), load_external_data=False)
    entries, sources = segment_sources(graph, out.data_path)

    def graph_for(plan: Plan) -> bytes:
        offsets = {e.id: placed.offset for e, placed in zip(entries, plan.entries)}
        relocate_external_data(graph, name, offsets)
        return graph.SerializeToString()

    flags = FLAG_PREPACKED if out.packed else FLAG_OPTIMIZED
    return write_segment(name, model_name, version, sources, graph_for, flags=flags,
                         key=bytes.fromhex(out.key)[:32], mode=mode, gid=gid,
                         creator_pid=creator_pid, progress=progress, source=source)


def cached_prepack(model_path: Path, cache_root: Path, opt_level: str, model_digest: str,
                   packed: bool = True) -> PrepackOutput:
    """The pre-pack for this model, ORT, CPU and level: from the cache, else made and cached.

    Made in a temporary folder and renamed into place, so a crash never leaves a half cache.
    """
    key = prepack_key(model_digest, opt_level, packed)
    final = cache_root / key
    graph, data = final / "model.opt.onnx", final / "model.opt.data"
    if graph.is_file() and data.is_file():
        return PrepackOutput(graph, data, key, packed)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache_root))
    try:
        run_prepack(model_path, tmp, opt_level, model_digest, packed)
        try:
            os.rename(tmp, final)
        except OSError:  # another builder won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PrepackOutput(graph, data, key, packed)


# --- CLI: python -m worker.prepack MODEL OUT_DIR --opt-level extended ---------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.prepack",
        description="Pre-pack MODEL into OUT_DIR/model.opt.onnx + model.opt.data with one ORT session.",
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--opt-level", choices=OPT_LEVELS, default="extended")
    parser.add_argument("--model-digest", default=None, help="defaults to sha256 of MODEL")
    args = parser.parse_args(argv)
    try:
        out = run_prepack(args.model, args.out_dir, args.opt_level, args.model_digest)
    except (ModelError, OSError) as exc:
        print(f"prepack failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"{out.graph_path}\t{out.data_path}\t{out.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
