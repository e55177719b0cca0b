"""A publish candidate: the file behind ``shmcache publish MODEL PATH``, loaded and checked.

One job: turn PATH into a complete ``onnx.ModelProto`` (every weight embedded) that may replace
the served version, or raise a typed error before any segment is built or any worker sees it.

PATH is either

* an ONNX file, whose inputs and outputs must match the served graph's (``SignatureMismatch``
  lists every difference unless the caller allows the change), or
* a weights file, a set of arrays by initializer name laid over a copy of the served graph
  (``WeightsError`` for anything that does not fit or does not decode):

  - ``.npz`` (a zip of ``.npy`` members, read with ``allow_pickle=False``; the zip CRC-32 of
    every member is checked, so a flipped byte is refused), or
  - safetensors, parsed here (no dependency)::

        0        +-----------------------------------------------------------+
                 | N: u64 little-endian, header length (<= MAX_HEADER_BYTES)  |
        8        +-----------------------------------------------------------+
                 | N bytes of UTF-8 JSON (may end in spaces):                 |
                 |   {"__metadata__": {str: str, ...},          (optional)   |
                 |    NAME: {"dtype": "F32", "shape": [2, 3],                 |
                 |           "data_offsets": [BEGIN, END]}, ...}              |
        8 + N    +-----------------------------------------------------------+
                 | data: each tensor's C-order little-endian bytes at         |
                 | [BEGIN, END) relative to 8 + N; the tensors tile the data  |
                 | region exactly (no gap, no overlap, nothing after)         |
        end      +-----------------------------------------------------------+

    The format carries no checksum: a flipped *data* byte cannot be detected, only every
    structural damage (truncation, header, offsets) is.

Detection is by content: zip magic means npz; a plausible header length followed by ``{`` means
safetensors; anything else is read as ONNX. The suffixes ``.npz`` and ``.safetensors`` force
their format, so a damaged weights file is reported as damaged weights, not as "not ONNX".
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from shmcache.dtypes import DTYPES_BY_CODE, numpy_dtype_for, type_name
from shmcache.errors import ModelError, SignatureMismatch, WeightsError
from shmcache.model import collect_weights, load_model

MAX_HEADER_BYTES = 100 * 2**20
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
MAX_LISTED = 10  # names quoted in one error message; the rest are counted

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# What zipfile, zlib/lzma/bz2 and numpy's .npy reader raise on damaged bytes. The reader is
# third-party code fed untrusted input; each of these means "the file is damaged".
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, TypeError,
    KeyError, IndexError, OverflowError, RuntimeError, SyntaxError, struct.error,
)

_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


# --- signatures -------------------------------------------------------------------------------


Dim = int | str | None


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output.

    ``shape`` holds each dim as an int (fixed), a str (symbolic, ``dim_param``) or None
    (unnamed dynamic); ``shape`` itself is None when the rank is unknown. ``kind`` is
    "tensor", or ONNX's text for other types ("seq(tensor(float))"; then elem_type is 0).
    """

    name: str
    elem_type: int
    shape: tuple[Dim, ...] | None
    kind: str = "tensor"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]


def signature_of(model: onnx.ModelProto) -> Signature:
    """The graph's inputs that callers feed (initializers excluded, IR < 4 lists them) and outputs."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    return Signature(
        tuple(_tensor_sig(v) for v in graph.input if v.name not in initializers),
        tuple(_tensor_sig(v) for v in graph.output),
    )


def check_callable(sig: Signature) -> None:
    """Refuse (ModelError) a model no request could run: one that requires an input the wire
    cannot carry (strings, sequences, maps), or whose every output is of such a type (or
    optional: a call cannot ask for an absent one). A model
    with only some such outputs is served: a call asks for the others by name."""
    from shmcache.protocol import ALLOWED_DTYPES

    def carried(t: TensorSig) -> bool:
        dtype = DTYPES_BY_CODE.get(t.elem_type)
        return t.kind == "tensor" and dtype is not None and dtype.name in ALLOWED_DTYPES

    def described(ts: Iterable[TensorSig]) -> str:
        return ", ".join(f"{t.name!r} ({t.kind if t.kind != 'tensor' else type_name(t.elem_type)})"
                         for t in ts)

    # An optional-typed input may be left out of a call; any other input is required.
    blocked = [t for t in sig.inputs if not carried(t) and not t.kind.startswith("optional(")]
    if blocked:
        raise ModelError(f"input(s) {described(blocked)} cannot be sent to the daemon "
                         f"(its wire carries tensors of {', '.join(sorted(ALLOWED_DTYPES))}), "
                         "so no request could run this model")
    if sig.outputs and not any(carried(t) for t in sig.outputs):
        raise ModelError(f"no output can be sent back ({described(sig.outputs)}; the "
                         f"wire carries tensors of {', '.join(sorted(ALLOWED_DTYPES))})")


def _tensor_sig(value: onnx.ValueInfoProto) -> TensorSig:
    if value.type.WhichOneof("value") != "tensor_type":
        return TensorSig(value.name, 0, None, _type_text(value.type))
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return TensorSig(value.name, tensor.elem_type, None)
    return TensorSig(value.name, tensor.elem_type, tuple(_dim(d) for d in tensor.shape.dim))


def _type_text(t: onnx.TypeProto) -> str:
    """ONNX's notation for a type: tensor(float), seq(tensor(int64)), map(string,tensor(float))."""
    which = t.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(t, which).elem_type
        return f"{which[: -len('_type')]}({helper.tensor_dtype_to_string(elem).split('.')[-1].lower()})"
    if which == "sequence_type":
        return f"seq({_type_text(t.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({_type_text(t.optional_type.elem_type)})"
    if which == "map_type":
        key = helper.tensor_dtype_to_string(t.map_type.key_type).split(".")[-1].lower()
        return f"map({key},{_type_text(t.map_type.value_type)})"
    return which or "undefined"


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    which = dim.WhichOneof("value")
    if which == "dim_value":
        return int(dim.dim_value)
    if which == "dim_param":
        return str(dim.dim_param)
    return None


def signature_differences(old: Signature, new: Signature) -> list[str]:
    """One line per way ``new`` serves callers differently from ``old``; empty when compatible.

    Two dynamic dims are the same whatever their names ('batch' vs 'N'): re-exports rename
    them freely and a caller sees no difference. Input order is not compared (inputs are fed
    by name); output order is, since ``run(None, ...)`` returns outputs positionally.
    """
    lines = _side_differences("input", old.inputs, new.inputs)
    lines += _side_differences("output", old.outputs, new.outputs)
    old_names = [s.name for s in old.outputs]
    new_names = [s.name for s in new.outputs]
    kept_old = [n for n in old_names if n in set(new_names)]
    kept_new = [n for n in new_names if n in set(old_names)]
    if kept_old != kept_new:
        lines.append(f"outputs reordered: {kept_old} -> {kept_new}")
    return lines


def _side_differences(
    what: str, old: tuple[TensorSig, ...], new: tuple[TensorSig, ...]
) -> list[str]:
    old_by_name = {s.name: s for s in old}
    new_by_name = {s.name: s for s in new}
    lines = [f"{what} {s.name!r} removed" for s in old if s.name not in new_by_name]
    for sig in old:
        if sig.name in new_by_name:
            lines += _tensor_differences(f"{what} {sig.name!r}", sig, new_by_name[sig.name])
    lines += [f"{what} {s.name!r} added" for s in new if s.name not in old_by_name]
    return lines


def _tensor_differences(where: str, a: TensorSig, b: TensorSig) -> list[str]:
    if a.kind != b.kind:
        return [f"{where}: type {a.kind} -> {b.kind}"]
    lines = []
    if a.elem_type != b.elem_type:
        lines.append(f"{where}: dtype {type_name(a.elem_type)} -> {type_name(b.elem_type)}")
    if a.shape is None or b.shape is None:
        if a.shape != b.shape:
            lines.append(f"{where}: shape {_shape_text(a.shape)} -> {_shape_text(b.shape)}")
    elif len(a.shape) != len(b.shape):
        lines.append(f"{where}: rank {len(a.shape)} -> {len(b.shape)} "
                     f"(shape {_shape_text(a.shape)} -> {_shape_text(b.shape)})")
    else:
        for axis, (x, y) in enumerate(zip(a.shape, b.shape)):
            if not _same_dim(x, y):
                lines.append(f"{where} dim {axis}: {_dim_text(x)} -> {_dim_text(y)}")
    return lines


def _same_dim(x: Dim, y: Dim) -> bool:
    if isinstance(x, int) or isinstance(y, int):
        return x == y
    return True  # both dynamic


def _dim_text(dim: Dim) -> str:
    return "?" if dim is None else repr(dim) if isinstance(dim, str) else str(dim)


def _shape_text(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join(_dim_text(d) for d in shape) + "]"


# --- the candidate ----------------------------------------------------------------------------


def load_candidate(
    path: str | os.PathLike[str],
    served_graph: bytes,
    served_tensors: Callable[[str], np.ndarray] | None = None,
    *,
    allow_signature_change: bool = False,
) -> onnx.ModelProto:
    """The model to build the next segment from, every weight embedded; or a typed error.

    ``served_graph`` is ``Segment.graph_bytes()`` of the version being served. A weights file
    replaces the initializers it names; the others keep their served values, read through
    ``served_tensors(name)`` (e.g. ``Segment.tensor``); with None, the file must give them all.
    Raises ``ModelError`` (missing file, not ONNX), ``SignatureMismatch``, ``WeightsError``.
    """
    path = Path(path)
    kind = _weights_kind(path)
    if kind is None:
        return _load_onnx(path, served_graph, allow_signature_change)
    served = _parse_served(served_graph)
    if kind == "npz":
        with _NpzWeights.from_path(path) as npz:
            return _apply_weights(served, npz, served_tensors, path)
    with _SafetensorsWeights.from_path(path) as st:
        return _apply_weights(served, st, served_tensors, path)


def is_weights_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds weights by name (.npz or safetensors) rather than an ONNX model."""
    return _weights_kind(Path(path)) is not None


def _weights_kind(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None  # load_model says why (missing, a directory, no permission)
    if head[:4] in ZIP_MAGICS:
        return "npz"
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors"):
        return suffix[1:]
    header_length = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= header_length <= MAX_HEADER_BYTES:
        return "safetensors"
    return None


def _load_onnx(path: Path, served_graph: bytes, allow_signature_change: bool) -> onnx.ModelProto:
    model = load_model(path)
    if allow_signature_change:
        return model
    differences = signature_differences(signature_of(_parse_served(served_graph)),
                                        signature_of(model))
    if differences:
        raise SignatureMismatch(
            f"{str(path)!r} changes the served model's inputs/outputs "
            f"({len(differences)} difference{'s' if len(differences) > 1 else ''}: "
            f"{'; '.join(differences)}); publish with --allow-signature-change to accept",
            differences,
        )
    return model


def _parse_served(served_graph: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(served_graph)
    except DecodeError as exc:
        raise ModelError(f"the served graph does not parse as ONNX: {exc}") from exc
    return model


# --- weights over the served graph ------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What a weights file says about one array, known before its bytes are read."""

    dtype: np.dtype
    shape: tuple[int, ...]


class _Weights(Protocol):
    where: str

    def specs(self) -> dict[str, _Spec]: ...

    def read(self, name: str) -> bytes:
        """The array's C-order little-endian bytes, exactly as ``specs()[name]`` describes."""
        ...


def _apply_weights(
    served: onnx.ModelProto,
    weights: _Weights,
    served_tensors: Callable[[str], np.ndarray] | None,
    path: Path,
) -> onnx.ModelProto:
    tensors = [w.tensor for w in collect_weights(served)]
    by_name = _served_by_name(tensors, weights.where)
    specs = weights.specs()
    _check_fits(specs, by_name, weights.where)
    unset = [t for t in tensors if t.name not in specs and t.data_location == TensorProto.EXTERNAL]
    if unset and served_tensors is None:
        raise WeightsError(
            f"{weights.where} gives {len(specs)} of the served graph's weights and no served "
            f"values were supplied for the other {len(unset)}: {_names(t.name for t in unset)}"
        )
    # Every check that needs no data is done; only now read (and CRC-check) the bytes.
    for tensor in tensors:
        if tensor.name in specs:
            _embed(tensor, weights.read(tensor.name))
        elif tensor.data_location == TensorProto.EXTERNAL:
            assert served_tensors is not None
            _embed(tensor, _served_bytes(tensor, served_tensors(tensor.name)))
    return served


def _served_by_name(tensors: list[TensorProto], where: str) -> dict[str, TensorProto]:
    by_name: dict[str, TensorProto] = {}
    duplicated = set()
    for tensor in tensors:
        if tensor.name in by_name:
            duplicated.add(tensor.name)
        by_name[tensor.name] = tensor
        if any(e.key.startswith("prepacked_") for e in tensor.external_data):
            # The stored graph of a pre-packed segment is ORT's optimized graph: its
            # initializers are ORT's (folded, fused, renamed), not the exporter's.
            raise WeightsError(
                f"{where} cannot be applied: the served graph is ONNX Runtime's pre-packed "
                f"graph (tensor {tensor.name!r}), not the exported one; publish an ONNX file"
            )
    if duplicated:
        raise WeightsError(
            f"{where} cannot be applied: the served graph has several initializers named "
            f"{_names(duplicated)} (in different subgraphs); publish an ONNX file"
        )
    return by_name


def _check_fits(specs: dict[str, _Spec], by_name: dict[str, TensorProto], where: str) -> None:
    unknown = [name for name in specs if name not in by_name]
    if unknown:
        raise WeightsError(
            f"{where}: {len(unknown)} tensor{'s' if len(unknown) > 1 else ''} "
            f"name{'' if len(unknown) > 1 else 's'} no initializer of the served graph: "
            f"{_names(unknown)}"
        )
    misfits = []
    for name, spec in specs.items():
        tensor = by_name[name]
        served = numpy_dtype_for(tensor.data_type)
        old = (_dtype_name(served), tuple(int(d) for d in tensor.dims))
        new = (_dtype_name(spec.dtype), spec.shape)
        if old[1] != new[1] or not _same_type(served, spec.dtype):
            misfits.append(f"{name!r}: served {old[0]}{list(old[1])}, file {new[0]}{list(new[1])}")
    if misfits:
        shown = "; ".join(misfits[:MAX_LISTED])
        more = f"; and {len(misfits) - MAX_LISTED} more" if len(misfits) > MAX_LISTED else ""
        raise WeightsError(f"{where}: dtype or shape differs from the served tensor: {shown}{more}")


def _served_bytes(tensor: TensorProto, array: np.ndarray) -> bytes:
    shape = tuple(int(d) for d in tensor.dims)
    if array.shape != shape or array.dtype != numpy_dtype_for(tensor.data_type):
        raise ModelError(f"served tensor {tensor.name!r} is {array.dtype}{list(array.shape)}, "
                         f"its graph says {type_name(tensor.data_type)}{list(shape)}")
    return array.tobytes()


def _embed(tensor: TensorProto, data: bytes) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    for field in _DATA_FIELDS:
        tensor.ClearField(field)
    tensor.raw_data = data


def _same_type(served: np.dtype, stored: np.dtype) -> bool:
    """numpy has no name for ml_dtypes' types (bfloat16, the 8-bit floats) and saves them in an
    .npz as raw bytes of their size ('|V2'): those are taken as the served type, as is."""
    if _dtype_name(served) == _dtype_name(stored):
        return True
    return (stored.kind == "V" and stored.fields is None and stored.itemsize == served.itemsize
            and served.type.__module__ == "ml_dtypes")


def _dtype_name(dtype: np.dtype) -> str:
    return _SAFETENSORS_NAMES.get(_little(dtype), str(dtype))


def _little(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    shown = ", ".join(repr(n) for n in listed[:MAX_LISTED])
    return shown + (f" and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else "")


def _check_bool(data: bytes, name: str, where: str) -> None:
    """numpy and ORT read a bool byte other than 0/1 differently; such a byte is damage."""
    if data and max(data) > 1:
        raise WeightsError(f"{where}: bool tensor {name!r} holds bytes other than 0 and 1")


# --- npz --------------------------------------------------------------------------------------


class _NpzWeights:
    """Arrays of an .npz; the .npy headers are checked before any array is allocated."""

    def __init__(self, path: Path, f: BinaryIO, npz: np.lib.npyio.NpzFile) -> None:
        self.where = repr(str(path))
        self._f = f
        self._npz = npz
        self._specs: dict[str, _Spec] = {}

    @classmethod
    def from_path(cls, path: Path) -> _NpzWeights:
        # We open the file: np.load leaks the one it opens when the zip directory is damaged.
        f = open(path, "rb")
        try:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npz suffix on a .npy file
                raise WeightsError(f"{str(path)!r} is not an .npz archive")
        except _DECODE_ERRORS as exc:
            f.close()
            raise _corrupted(path, exc) from exc
        except BaseException:
            f.close()
            raise
        return cls(path, f, npz)

    def __enter__(self) -> _NpzWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._npz.close()
        self._f.close()

    def specs(self) -> dict[str, _Spec]:
        archive = self._npz.zip
        assert archive is not None  # np.load of a zip always opens it
        members = archive.infolist()
        if not members:
            raise WeightsError(f"{self.where} holds no arrays")
        for info in members:
            if not info.filename.endswith(".npy"):
                raise WeightsError(f"{self.where}: member {info.filename!r} is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in self._specs:
                raise WeightsError(f"{self.where}: array {name!r} appears twice")
            try:
                self._specs[name] = self._peek(info)
            except WeightsError:
                raise
            except _DECODE_ERRORS as exc:
                raise _corrupted(self.where, exc) from exc
        return dict(self._specs)

    def _peek(self, info: zipfile.ZipInfo) -> _Spec:
        # numpy allocates the whole array from the header's shape before reading any data, and
        # it only reads to the member's end (where zipfile checks the CRC) if the header
        # describes the member exactly: check both here, before np.load reads anything.
        archive = self._npz.zip
        assert archive is not None
        with archive.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise WeightsError(f"{self.where}: {info.filename!r} is .npy version {version}")
            if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                raise WeightsError(f"{self.where}: {info.filename!r} is an object or record "
                                   f"array ({dtype}); only plain numeric arrays are read")
            expected = fp.tell() + math.prod(shape) * dtype.itemsize
        if expected != info.file_size:
            raise WeightsError(f"{self.where} is corrupted or truncated: {info.filename!r} holds "
                               f"{info.file_size} bytes, its header describes {expected}")
        return _Spec(dtype, tuple(int(d) for d in shape))

    def read(self, name: str) -> bytes:
        try:
            array = self._npz[name]
        except _DECODE_ERRORS as exc:
            raise _corrupted(self.where, exc) from exc
        spec = self._specs[name]
        if not isinstance(array, np.ndarray) or array.shape != spec.shape:
            raise WeightsError(f"{self.where} is corrupted: {name!r} changed while read")
        data = array.astype(_little(array.dtype), copy=False).tobytes()
        if array.dtype == np.bool_:
            _check_bool(data, name, self.where)
        return data


def _corrupted(where: Path | str, exc: BaseException) -> WeightsError:
    where = repr(str(where)) if isinstance(where, Path) else where
    return WeightsError(f"{where} is corrupted or truncated: {type(exc).__name__}: {exc}")


# --- safetensors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    spec: _Spec
    begin: int
    end: int


class _SafetensorsWeights:
    """A safetensors file; the whole header is validated on open, data is read per tensor."""

    def __init__(self, path: Path, f: BinaryIO) -> None:
        self.where = repr(str(path))
        self._f = f
        self._slots: dict[str, _Slot] = {}
        self._data_start = 0
        self.metadata: dict[str, str] = {}

    @classmethod
    def from_path(cls, path: Path) -> _SafetensorsWeights:
        f = open(path, "rb")
        try:
            weights = cls(path, f)
            weights._parse(os.fstat(f.fileno()).st_size)
        except BaseException:
            f.close()
            raise
        return weights

    def __enter__(self) -> _SafetensorsWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def _fail(self, why: str) -> WeightsError:
        return WeightsError(f"{self.where} is corrupted or truncated: {why}")

    def _parse(self, size: int) -> None:
        if size < 8:
            raise self._fail(f"{size} bytes is too short for the header length")
        length = int.from_bytes(self._f.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise self._fail(f"header length {length} is over the {MAX_HEADER_BYTES} limit")
        if 8 + length > size:
            raise self._fail(f"header length {length} but only {size - 8} bytes follow")
        raw = self._f.read(length)
        if len(raw) != length:
            raise self._fail("the file shrank while read")
        header = self._decode(raw)
        self._data_start = 8 + length
        self.metadata = self._metadata(header.pop("__metadata__", None))
        for name, info in header.items():
            self._slots[name] = self._slot(name, info)
        self._check_tiling(size - self._data_start)

    def _decode(self, raw: bytes) -> dict[str, object]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._fail(f"header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        return header

    def _metadata(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail("__metadata__ is not an object of strings")
        return value

    def _slot(self, name: str, info: object) -> _Slot:
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self._fail(f"{where}: entry must hold exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{self.where}: {where} has dtype {dtype!r}; supported: "
                               f"{', '.join(SAFETENSORS_DTYPES)}")
        if not _is_ints(shape, min_value=0):
            raise self._fail(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not _is_ints(offsets, min_value=0) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise self._fail(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        numpy_dtype = SAFETENSORS_DTYPES[dtype]
        needed = math.prod(shape) * numpy_dtype.itemsize
        if offsets[1] - offsets[0] != needed:
            raise self._fail(f"{where}: {dtype}{shape} needs {needed} bytes, "
                             f"data_offsets span {offsets[1] - offsets[0]}")
        return _Slot(_Spec(numpy_dtype, tuple(shape)), offsets[0], offsets[1])

    def _check_tiling(self, data_length: int) -> None:
        cursor = 0
        for name, slot in sorted(self._slots.items(), key=lambda item: (item[1].begin, item[1].end)):
            if slot.begin != cursor:
                what = "overlaps the previous tensor" if slot.begin < cursor else "leaves a gap"
                raise self._fail(f"tensor {name!r} at [{slot.begin}, {slot.end}) {what}")
            cursor = slot.end
        if cursor != data_length:
            raise self._fail(f"tensors need {cursor} bytes of data, the file holds {data_length}")

    def specs(self) -> dict[str, _Spec]:
        if not self._slots:
            raise WeightsError(f"{self.where} holds no tensors")
        return {name: slot.spec for name, slot in self._slots.items()}

    def read(self, name: str) -> bytes:
        # One read straight into the bytes that become raw_data: np.fromfile/memmap would add
        # a copy (array -> tobytes) on the way into the protobuf.
        slot = self._slots[name]
        self._f.seek(self._data_start + slot.begin)
        data = self._f.read(slot.end - slot.begin)
        if len(data) != slot.end - slot.begin:
            raise self._fail(f"tensor {name!r}: the file shrank while read")
        if slot.spec.dtype == np.bool_:
            _check_bool(data, name, self.where)
        return data


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _is_ints(value: object, min_value: int) -> bool:
    # bool is an int subclass in Python; JSON true is not a dimension.
    return isinstance(value, list) and all(
        type(v) is int and v >= min_value for v in value
    )


def save_safetensors(
    path: str | os.PathLike[str],
    arrays: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``arrays`` as a safetensors file (the layout drawn at the top of this module)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs = []
    cursor = 0
    for name, array in arrays.items():
        dtype = _little(np.asarray(array).dtype)
        if dtype not in _SAFETENSORS_NAMES:
            raise WeightsError(f"array {name!r}: dtype {dtype} has no safetensors type")
        # np.require, not ascontiguousarray: that one makes a 0-d array 1-d (shape [1]), which
        # a scalar weight (a zero point) would then be refused for.
        data = np.require(np.asarray(array, dtype=dtype), requirements="C")
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(data.shape),
                        "data_offsets": [cursor, cursor + data.nbytes]}
        blobs.append(data)
        cursor += data.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for data in blobs:
            f.write(data.reshape(-1).view(np.uint8).data)
