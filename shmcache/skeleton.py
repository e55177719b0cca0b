"""An ONNX file's graph without its weight bytes, read without parsing the weights.

A publish checks the candidate's inputs and outputs against the served model's. When the served
version lives in an optimized segment, its own inputs and outputs are those of the original file
(a complete, self-contained copy under the state directory, as big as the weights). Parsing all of
it for a dozen names costs a second of CPU per publish, taken from the workers serving meanwhile.
This module walks the protobuf wire format over a read-only mapping instead and keeps every field
except the data of weight tensors:

    ModelProto                    (every field copied as is, but)
      7  graph: GraphProto        (every field copied as is, but)
           5  initializer: TensorProto*       kept without their data fields:
                4 float_data  5 int32_data  6 string_data  7 int64_data
                9 raw_data   10 double_data 11 uint64_data
          15  sparse_initializer: SparseTensorProto*  dropped

    wire record = key varint (field << 3 | wire type) + payload:
      type 0 varint | type 1 8 bytes | type 2 length varint + bytes | type 5 4 bytes

so initializer names, dtypes and dims survive (``signature_of`` leaves initializers out of the
inputs by name), and the result parses as an ordinary, small ModelProto. A file that ends inside
a record, or uses a wire type ONNX never writes, raises ``ModelError``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator

from shmcache.errors import ModelError

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
GRAPH_SPARSE_INITIALIZER = 15
TENSOR_DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})

WIRE_VARINT, WIRE_FIXED64, WIRE_BYTES, WIRE_FIXED32 = 0, 1, 2, 5
MAX_VARINT_BYTES = 10

Record = tuple[int, int, int, int]  # field, wire type, record start, record end


def graph_skeleton(path: str | os.PathLike[str]) -> bytes:
    """The ModelProto in ``path`` with every weight's data left out, serialized."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelError(f"{str(path)!r} is empty")
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mem:
                view = memoryview(mem)
                try:
                    return bytes(_model(view, str(path)))
                finally:
                    view.release()
    except OSError as exc:
        raise ModelError(f"cannot read {str(path)!r}: {exc}") from exc


def _model(buf: memoryview, where: str) -> bytearray:
    return _message(buf, 0, len(buf), where, rewrite={MODEL_GRAPH: _graph})


def _graph(buf: memoryview, lo: int, hi: int, where: str) -> bytearray:
    return _message(buf, lo, hi, where, drop=frozenset({GRAPH_SPARSE_INITIALIZER}),
                    rewrite={GRAPH_INITIALIZER: _tensor_header})


def _tensor_header(buf: memoryview, lo: int, hi: int, where: str) -> bytearray:
    return _message(buf, lo, hi, where, drop=TENSOR_DATA_FIELDS)


Rewrite = Callable[[memoryview, int, int, str], bytearray]


def _message(buf: memoryview, lo: int, hi: int, where: str, *,
             drop: frozenset[int] = frozenset(),
             rewrite: dict[int, Rewrite] | None = None) -> bytearray:
    """The message in ``buf[lo:hi]`` re-encoded: records of fields in ``drop`` left out, the
    length-delimited ones of fields in ``rewrite`` replaced by what their function makes of
    the payload, every other record copied as is."""
    out = bytearray()
    for field, wire, start, end in _records(buf, lo, hi, where):
        if field in drop:
            continue
        if rewrite and field in rewrite and wire == WIRE_BYTES:
            _put_bytes(out, field, rewrite[field](buf, _payload_start(buf, start), end, where))
        else:
            out += buf[start:end]
    return out


def _records(buf: memoryview, lo: int, hi: int, where: str) -> Iterator[Record]:
    """Each wire record of the message in ``buf[lo:hi]``."""
    pos = lo
    while pos < hi:
        start = pos
        key, pos = _varint(buf, pos, hi, where)
        field, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            _, pos = _varint(buf, pos, hi, where)
        elif wire == WIRE_FIXED64:
            pos += 8
        elif wire == WIRE_FIXED32:
            pos += 4
        elif wire == WIRE_BYTES:
            length, pos = _varint(buf, pos, hi, where)
            pos += length
        else:
            raise ModelError(f"{where!r} is not an ONNX model (wire type {wire} at byte {start})")
        if field == 0 or pos > hi:
            raise ModelError(f"{where!r} is not an ONNX model, or is truncated "
                             f"(a record at byte {start} ends past its message)")
        yield field, wire, start, pos


def _payload_start(buf: memoryview, record_start: int) -> int:
    """Where a length-delimited record's bytes begin (after its key and length)."""
    _, pos = _varint(buf, record_start, len(buf), "")
    _, pos = _varint(buf, pos, len(buf), "")
    return pos


def _varint(buf: memoryview, pos: int, hi: int, where: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(hi, pos + MAX_VARINT_BYTES)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise ModelError(f"{where!r} is not an ONNX model, or is truncated (bad varint at byte {pos})")


def _put_bytes(out: bytearray, field: int, payload: bytes | bytearray) -> None:
    _put_varint(out, field << 3 | WIRE_BYTES)
    _put_varint(out, len(payload))
    out += payload


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
