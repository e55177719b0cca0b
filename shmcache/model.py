"""From an ONNX model file to a segment: every weight tensor out of the graph, into shared memory.

A real exporter keeps weights in several places: graph initializers, ``Constant`` nodes, and the
initializers and constants of subgraphs (``If``/``Loop``/``Scan`` bodies). All of them become
entries of the segment. Each weight's TensorProto in the stored graph is rewritten as external
data pointing back into the segment file itself::

    TensorProto(name, dims, data_type,
                data_location = EXTERNAL,
                external_data = {location: <segment name>, offset: <entry offset>,
                                 length: <entry length>})

so ONNX Runtime, opened on the stored graph with /dev/shm as the external-data folder, finds
every weight in the shared pages; a worker may also hand the numpy views to ``add_initializer``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, TensorProto, numpy_helper

from shmcache.dtypes import DTYPES_BY_CODE, numpy_dtype_for
from shmcache.errors import ModelError
from shmcache.segment import EntrySource, OwnedSegment, Plan, write_segment


@dataclass
class Weight:
    """A TensorProto that carries data, and the graph that owns it."""

    tensor: TensorProto
    graph: GraphProto


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file (and its external data files) or raise ``ModelError`` saying why."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {str(path)!r} is not a file")
    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise ModelError(f"{str(path)!r} is not an ONNX model (protobuf: {exc})") from exc
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelError(f"cannot load {str(path)!r}: {exc}") from exc
    check_is_model(model, str(path))
    return model


def check_is_model(model: onnx.ModelProto, where: str) -> None:
    """Protobuf parses many byte strings; a model must at least have a graph that computes."""
    if model.ir_version <= 0 or not model.opset_import:
        raise ModelError(f"{where!r} is not an ONNX model (no IR version or opset)")
    if not model.graph.node or not model.graph.output:
        raise ModelError(f"{where!r} is not an ONNX model (its graph has no nodes or outputs)")


def hoist_constants(model: onnx.ModelProto, graph: GraphProto) -> None:
    """Turn ``Constant`` nodes with a tensor ``value`` into initializers of the same graph.

    An initializer is the one place every ONNX consumer accepts external data, so this is what
    lets a Constant's bytes live in the segment. IR < 4 requires every initializer to be a graph
    input too; those old models keep their (usually tiny) constants inline.
    """
    if model.ir_version < 4:
        return
    # Delete in place, last first: rebuilding the node list would copy every node, detaching
    # the subgraphs that later steps still have to rewrite.
    for index in range(len(graph.node) - 1, -1, -1):
        value = _constant_value(graph.node[index])
        if value is None:
            continue
        tensor = graph.initializer.add()
        tensor.CopyFrom(value)
        tensor.name = graph.node[index].output[0]
        del graph.node[index]


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
    return None


def collect_weights(model: onnx.ModelProto) -> list[Weight]:
    """Hoist constants, then list every initializer of the model and of its subgraphs."""
    weights: list[Weight] = []
    _collect(model, model.graph, weights)
    return weights


def _collect(model: onnx.ModelProto, graph: GraphProto, into: list[Weight]) -> None:
    hoist_constants(model, graph)  # first: it edits the node list the subgraphs hang from
    into.extend(Weight(t, graph) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _collect(model, attr.g, into)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect(model, sub, into)


def take_source(weight: Weight) -> EntrySource:
    """Detach a weight's bytes from its TensorProto into an entry source (one copy, later)."""
    t = weight.tensor
    dtype = numpy_dtype_for(t.data_type)
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise ModelError(f"tensor {t.name!r} has a negative dimension {shape}")
    length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if t.data_location == TensorProto.EXTERNAL:
        raise ModelError(f"tensor {t.name!r}: external data was not loaded")
    data: bytes | np.ndarray = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t)
    if isinstance(data, bytes) and len(data) != length:
        raise ModelError(f"tensor {t.name!r}: {len(data)} bytes of data for shape {shape}")
    if not stays_inline(length):
        _clear_data(t)

    def fill(dest: memoryview) -> None:
        if isinstance(data, bytes):
            dest[:] = data
        else:
            np.frombuffer(dest, dtype).reshape(shape)[...] = data

    return EntrySource(t.name, t.data_type, shape, length, fill)


# Tensors below a page stay inline in the stored graph as well as in the table: ONNX Runtime's
# shape inference reads shapes, pads and fill values from initializers while it loads a model
# and cannot read them from external data ("Cannot parse data from external tensors", seen on
# silero-vad's ConstantOfShape). A page per tiny tensor per worker is all that costs.
INLINE_BELOW = 4096


def stays_inline(length: int) -> bool:
    return length < INLINE_BELOW


def stays_in_graph_only(t: TensorProto) -> bool:
    """A small tensor of a type the segment cannot hold (a few string labels for a Gather)
    stays in the graph and out of the table: it would stay inline anyway (INLINE_BELOW)."""
    return (t.data_type not in DTYPES_BY_CODE and t.data_location != TensorProto.EXTERNAL
            and t.ByteSize() < INLINE_BELOW)


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


def _clear_data(t: TensorProto) -> None:
    for name in _DATA_FIELDS:
        t.ClearField(name)


def point_at_segment(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Rewrite a TensorProto as external data at ``offset`` in the segment file ``location``."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value


def model_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model file, for cache keys."""
    h = hashlib.sha256()
    for chunk in _file_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def _file_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            yield chunk


# An external-data reference is a StringStringEntryProto whose key (field 1, length-delimited:
# tag 0x0A) is the 8 bytes "location". A file without these bytes references no external data
# file, so it alone holds every weight. The converse may be wrong (weight bytes or a metadata
# key can contain them): that only costs a re-serialization, never an incomplete copy.
EXTERNAL_LOCATION_KEY = b"\x0a\x08location"
SCAN_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class ModelFileScan:
    digest: str  # SHA-256 of the file's bytes
    self_contained: bool  # no external data reference: copying the file copies every weight


def scan_model_file(path: str | os.PathLike[str],
                    copy_to: str | os.PathLike[str] | None = None) -> ModelFileScan:
    """One read of a model file: its digest, and whether it may reference external data.

    With ``copy_to``, the same pass writes the bytes there (a publish's durable copy: reading
    256 MiB twice, once to scan and once to copy, is CPU taken from the serving workers)."""
    h = hashlib.sha256()
    found = False
    overlap = len(EXTERNAL_LOCATION_KEY) - 1
    tail = b""  # the previous chunk's last bytes: a match may straddle two chunks
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(copy_to, "wb")) if copy_to is not None else None
        for chunk in _file_chunks(path):
            h.update(chunk)
            if out is not None:
                out.write(chunk)
            if not found:
                found = (EXTERNAL_LOCATION_KEY in tail + chunk[:overlap]
                         or EXTERNAL_LOCATION_KEY in chunk)
                tail = chunk[-overlap:]
    return ModelFileScan(h.hexdigest(), not found)


def build_model_segment(
    model: onnx.ModelProto,
    *,
    name: str,
    model_name: str,
    version: int,
    mode: int = 0o600,
    gid: int | None = None,
    creator_pid: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    source: bytes = b"",
) -> OwnedSegment:
    """Write ``model``'s weights and its rewritten graph into a new sealed segment.

    ``model`` is consumed: its tensors lose their data and become references to the segment.
    """
    weights = [w for w in collect_weights(model) if not stays_in_graph_only(w.tensor)]
    sources = [take_source(w) for w in weights]

    def graph_for(plan: Plan) -> bytes:
        for weight, entry in zip(weights, plan.entries):
            if not stays_inline(entry.length):
                point_at_segment(weight.tensor, name, entry.offset, entry.length)
        return model.SerializeToString()

    return write_segment(name, model_name, version, sources, graph_for, mode=mode, gid=gid,
                         creator_pid=creator_pid, progress=progress, source=source)
