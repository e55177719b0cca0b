"""The wire protocol between clients and workers: length-prefixed msgpack frames.

One module owns every byte that crosses the client socket (STYLE.md principle 7); the worker,
the supervisor's control socket and both clients import from here and nowhere else.

Frame
-----
::

    0        4                                   4+N
    +--------+-----------------------------------+
    | N (u32 | one msgpack map, N bytes          |
    |  big-  | (N >= 1, N <= max_frame)          |
    | endian)|                                   |
    +--------+-----------------------------------+

``max_frame`` defaults to ``DEFAULT_MAX_FRAME`` (272 MiB: a 256 MiB tensor plus headroom) and is
checked on the 4-byte header *before* the body is buffered, so a hostile peer cannot make us
allocate more than that.  N > max_frame -> ``FrameTooLarge``; N == 0 -> ``Malformed``.  The body
is unpacked with msgpack's own limits for untrusted input (``max_bin_len`` = max_frame,
``max_ext_len=0``, ``strict_map_key=True``, ``raw=False``): ext types are refused.  A request
(client -> worker or supervisor) is held tighter: at most ``MAX_REQUEST_ITEMS`` (1024) entries
in any map or array (inputs, outputs, a shape) and strings of at most ``MAX_REQUEST_STR``
(64 KiB), so that one frame cannot hold the reader's loop for seconds building millions of
entries; a longer request is unreadable (``Malformed``, connection closed).  A response's
inline outputs are held to max_frame by the sender (``FrameTooLarge`` on the request's id).

Request (client -> worker)
--------------------------

=========  ==============  ===================================================================
key        type            meaning
=========  ==============  ===================================================================
v          int             ``PROTOCOL_VERSION`` (1); another value -> error ``malformed``
id         int             0 .. 2**63-1, chosen by the client, unique among its in-flight calls
op         str             ``infer`` | ``models`` | ``ping`` | ``attach`` (workers; the control
                           socket has its own ops); unknown -> error ``unsupported_op``
model      str             infer only: model name
inputs     map str->T      infer only: input name -> tensor T
outputs    [str] | nil     infer only, optional: output names; nil/absent = all, model order
version    int | nil       optional: pin the weight version
out        [int, int]      infer only, optional, needs an attached arena: [offset, nbytes] of
                           the arena where the worker may put the outputs
=========  ==============  ===================================================================

``attach`` hands the worker a shared-memory arena for this connection (``shmcache.arena``
draws the exchange: two replies on the request's id, with one byte carrying the memfd between
them).

Tensor T
--------

=====  ===========  ==========================================================================
key    type         meaning
=====  ===========  ==========================================================================
dtype  str          numpy name, one of ``ALLOWED_DTYPES`` (else ``bad_dtype``)
shape  [int]        non-negative ints, at most ``MAX_DIMS`` (32); [] is a scalar
data   bin          raw little-endian C-order bytes, len == prod(shape) * itemsize
                    (else ``bad_shape``)
shm    [int, int]   instead of ``data``, on a connection with an arena: [offset, nbytes] of
                    the same bytes in the arena (nbytes checked like len(data); a range
                    outside the arena -> ``malformed``)
=====  ===========  ==========================================================================

Response (worker -> client)
---------------------------

Always ``v``, ``id``, ``ok`` (bool).  Responses may come back in any order; match them by id.

=========  ===========================================================================
op / case  extra keys
=========  ===========================================================================
infer      ``version`` int (weights that computed it), ``outputs`` [[name, T], ...] in
           the order asked, ``compute`` float (optional): seconds the model ran in the
           worker, without queueing or transport
models     ``models`` [{name, version, inputs: [{name, dtype, shape}], outputs: [...],
           overridable: [...]}] (dynamic dims are str or nil; shape nil: declared without
           one, any rank; overridable: initializers a call may feed, optional inputs)
ping       ``ready`` bool, ``pid`` int, optional extra info keys
other ops  op-specific keys (see ``ok_result``)
error      ``ok`` false, ``error`` {code: str, message: str}; code is a key of
           ``shmcache.errors.ERROR_CLASSES``
=========  ===========================================================================

Malformed frames versus bad requests
------------------------------------
A frame that cannot be decoded (bad length, not msgpack, not a map, missing or invalid ``id``)
leaves the byte stream untrustworthy, like msgpack's Unpacker after any error but OutOfData:
the server sends a best-effort error with id nil and closes the connection.  ``parse_request``
signals this case by raising ``Malformed`` with ``request_id is None``.  A well-framed map with
bad contents gets an error response on its id and the connection stays open.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np

from shmcache import errors

PROTOCOL_VERSION: int = 1
DEFAULT_MAX_FRAME: int = 272 * 1024 * 1024
HEADER = struct.Struct(">I")
MAX_DIMS = 32
MAX_ID = 2**63 - 1
MAX_REQUEST_ITEMS = 1024  # entries in any one map or array of a request
MAX_REQUEST_STR = 64 * 1024  # bytes of any one string in a request (names, codes)
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
DEFAULT_OPS: frozenset[str] = frozenset({"infer", "models", "ping"})
# Ops a client may resend on a fresh connection after a broken one: they change nothing.
IDEMPOTENT_OPS: frozenset[str] = DEFAULT_OPS
ATTACH = "attach"
WORKER_OPS: frozenset[str] = DEFAULT_OPS | {ATTACH}

# The wire is little-endian whatever the host is; "<" keeps frombuffer honest on big-endian
# hosts and makes the equality test in tensor_to_wire a no-op (no copy) on little-endian ones.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES
}
# dtype -> wire name for the common (native, little-endian) case; ``dtype.name`` is a
# Python-level property that showed up at ~5% of a tiny round trip under cProfile.
_NAME_OF: dict[np.dtype[Any], str] = {dtype: name for name, dtype in _WIRE_DTYPES.items()}
# Below this, header and body go out in one write (one syscall); above it, joining them would
# copy a large tensor a second time just to save a syscall.
_JOIN_LIMIT = 64 * 1024


# --- framing --------------------------------------------------------------------------------


def encode_frame_parts(msg: Mapping[str, Any], max_frame: int | None = None) -> list[bytes | memoryview]:
    """Pack ``msg`` into ``[header, body]`` without copying the body out of msgpack's buffer.

    msgpack copies each tensor once into its buffer; ``packb`` would copy it again into a bytes
    object and ``header + body`` a third time.  ``getbuffer()`` hands out the packer's buffer
    itself, so writers that take several buffers (``sendall`` twice, ``writelines``) pay for
    exactly one copy.  ``max_frame`` lets a sender refuse a frame the peer would reject anyway.
    """
    packer = msgpack.Packer(autoreset=False)
    packer.pack(msg)
    body = packer.getbuffer()
    size = len(body)
    if max_frame is not None and size > max_frame:
        body.release()
        raise errors.FrameTooLarge(f"frame of {size} bytes exceeds max_frame={max_frame}")
    header = HEADER.pack(size)
    if size <= _JOIN_LIMIT:
        joined = header + body
        body.release()
        return [joined]
    return [header, body]


def encode_frame(msg: Mapping[str, Any]) -> bytes:
    """Header + packed body as one bytes object (two copies of tensors; see encode_frame_parts)."""
    return b"".join(encode_frame_parts(msg))


def decode_body(body: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME,
                requests: bool = False) -> dict[str, Any]:
    """Unpack one frame body into a map, or raise ``Malformed``; ``requests``: the body is a
    request, held to MAX_REQUEST_ITEMS and MAX_REQUEST_STR (see the top of this module).

    msgpack reports bad input through a zoo of ValueError subclasses (ExtraData, FormatError,
    StackError, UnicodeDecodeError) plus TypeError for unhashable keys; all of them mean the
    peer sent something that is not a frame, so all of them become one typed error.
    """
    items = MAX_REQUEST_ITEMS if requests else max_frame
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_frame,
            max_str_len=MAX_REQUEST_STR if requests else max_frame,
            max_array_len=items,
            max_map_len=items if requests else max_frame // 2,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # Some of them say nothing (a StackError's message is empty): name the kind at least.
        said = f": {str(exc)[:200]}" if str(exc) else ""
        raise errors.Malformed(
            f"frame body is not a readable msgpack map ({type(exc).__name__}{said})") from exc
    if not isinstance(obj, dict):
        raise errors.Malformed(f"frame body is a {type(obj).__name__}, not a map")
    return obj


class FrameDecoder:
    """Turn a byte stream into messages: ``feed()`` what arrived, get the complete maps back.

    Shaped like msgpack's ``Unpacker``: it keeps partial frames between calls, and after it
    raises ``FrameTooLarge`` or ``Malformed`` the stream position is lost, so it refuses further
    input and the caller must close the connection.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, requests: bool = False) -> None:
        self.max_frame = max_frame
        self.requests = requests  # decode_body's: frames from clients, held tighter
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read, once known
        self._broken = False

    def pending(self) -> int:
        """Bytes buffered but not yet returned as a message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Buffer ``data``; return every message it completed, in order."""
        if self._broken:
            raise errors.Malformed("decoder is unusable after an earlier error")
        try:
            return self._feed(data)
        except errors.RemoteError:
            self._broken = True
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    return out
                self._need = self._check_header(HEADER.unpack_from(self._buf)[0])
            end = HEADER.size + self._need
            if len(self._buf) < end:
                return out
            with memoryview(self._buf) as view, view[HEADER.size : end] as body:
                out.append(decode_body(body, self.max_frame, self.requests))
            # Deleting from the front of a bytearray is O(1) in CPython (it moves ob_start).
            del self._buf[:end]
            self._need = None

    def _check_header(self, size: int) -> int:
        if size > self.max_frame:
            raise errors.FrameTooLarge(f"frame of {size} bytes exceeds max_frame={self.max_frame}")
        if size == 0:
            raise errors.Malformed("frame of length 0")
        return size


# --- tensors --------------------------------------------------------------------------------


class ArenaView(Protocol):
    """Where ``shm`` tensors live: ``shmcache.arena``'s WorkerArena (a view, no copy) or
    ClientArena (a copy, since the client reuses the region on its next call)."""

    def view(self, offset: int, nbytes: int) -> bytes | memoryview: ...


def as_c_contiguous(arr: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray`` that keeps 0-d arrays 0-d (it turns a scalar into shape (1,))."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def wire_array(arr: np.ndarray, what: str = "tensor") -> tuple[str, np.ndarray]:
    """The wire dtype name and a C-contiguous little-endian array of the same values.

    Only big-endian or non-contiguous arrays are converted (one copy each).  Unsupported
    dtypes raise ``BadDtype`` naming ``what`` ("input 'x'").
    """
    name = _NAME_OF.get(arr.dtype) or arr.dtype.name
    wire = _WIRE_DTYPES.get(name)
    if wire is None or arr.dtype.kind not in "biuf":
        kind = " (strings or objects)" if arr.dtype.kind in "OSU" else ""
        raise errors.BadDtype(f"{what} has dtype {arr.dtype}{kind}, which the wire cannot carry; "
                              f"it carries {', '.join(sorted(ALLOWED_DTYPES))}")
    if arr.dtype != wire:
        arr = arr.astype(wire, order="C")
    return name, as_c_contiguous(arr)


def tensor_to_wire(arr: np.ndarray, what: str = "tensor") -> dict[str, Any]:
    """Describe ``arr`` as a wire tensor; ``data`` is a view of the array, not a copy
    (msgpack then copies the view once into its buffer)."""
    return _inline_tensor(*wire_array(arr, what))


def _inline_tensor(dtype_name: str, arr: np.ndarray) -> dict[str, Any]:
    """The wire tensor of an array ``wire_array`` already converted."""
    return {"dtype": dtype_name, "shape": list(arr.shape),
            "data": arr.reshape(-1).view(np.uint8).data}


def tensor_ref(dtype_name: str, shape: Iterable[int], offset: int, nbytes: int) -> dict[str, Any]:
    """A wire tensor whose bytes are in the connection's arena."""
    return {"dtype": dtype_name, "shape": list(shape), "shm": [offset, nbytes]}


def tensor_from_wire(obj: object, arena: ArenaView | None = None) -> np.ndarray:
    """Check a wire tensor and return an array over its bytes (no copy of ``data``; an ``shm``
    tensor reads from ``arena``)."""
    if not isinstance(obj, dict):
        raise errors.Malformed(f"tensor must be a map, got {type(obj).__name__}")
    dtype_name, shape = obj.get("dtype"), obj.get("shape")
    if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
        raise errors.BadDtype(f"dtype {brief(dtype_name)} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise errors.BadShape(f"shape must be a list of at most {MAX_DIMS} ints, got {brief(shape)}")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise errors.BadShape(f"shape must hold non-negative ints, got {brief(shape)}")
    dtype = _WIRE_DTYPES[dtype_name]
    # Python ints: a hostile shape like [2**62, 2**62] must not overflow into a match.
    expected = math.prod(shape) * dtype.itemsize
    data = tensor_bytes(obj, arena)
    if len(data) != expected:
        raise errors.BadShape(
            f"data has {len(data)} bytes, shape {shape} of {dtype_name} needs {expected}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # zero bytes, yet dims numpy cannot hold: [2**63, 0] and the like
        raise errors.BadShape(f"shape {shape} of {dtype_name} is not a valid array: {exc}") from None


def tensor_bytes(obj: dict[str, Any], arena: ArenaView | None) -> bytes | memoryview:
    """A wire tensor's bytes: its ``data``, or its ``shm`` range of ``arena`` (checked)."""
    if "shm" not in obj:
        data = obj.get("data")
        # bytes off the wire; a memoryview where the client put its arena copy (writable)
        if not isinstance(data, (bytes, memoryview)):
            raise errors.Malformed(f"tensor data must be bin, got {type(data).__name__}")
        return data
    ref = obj["shm"]
    if not (isinstance(ref, list) and len(ref) == 2 and all(_is_int(v) and v >= 0 for v in ref)):
        raise errors.Malformed(f"shm must be [offset, nbytes] of non-negative ints, got {brief(ref)}")
    if arena is None:
        raise errors.Malformed("tensor refers to shared memory, but this connection has no arena")
    return arena.view(ref[0], ref[1])


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request that passed every check at the edge; inner code trusts it (principle 8)."""

    id: int
    op: str
    model: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    version: int | None
    raw: dict[str, Any]
    out: tuple[int, int] | None = None  # arena region for the outputs


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass, and never a valid id or version


def brief(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors quote what a client sent, and a
    client may send megabytes (an error once echoed a 19 MiB list back as 57 MiB)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_request(msg: object, ops: frozenset[str] = DEFAULT_OPS,
                  arena: ArenaView | None = None) -> Request:
    """Validate a decoded frame as a request.

    Raises ``Malformed`` with ``request_id=None`` when the frame has no usable id (the caller
    must close the connection), otherwise a typed ``RemoteError`` carrying the request id so
    the caller can answer it and keep the connection.  ``ops`` lets the control socket accept
    its own ops through the same checks; ``arena`` is the connection's, for ``shm`` tensors.
    """
    if not isinstance(msg, dict):
        raise errors.Malformed(f"request must be a map, got {type(msg).__name__}")
    rid: Any = msg.get("id")
    if not _is_int(rid) or not 0 <= rid <= MAX_ID:
        raise errors.Malformed(f"request id must be an int in 0..2**63-1, got {brief(rid)}")
    try:
        return _parse_fields(rid, msg, ops, arena)
    except errors.RemoteError as exc:
        exc.request_id = rid
        raise
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        # Something our checks let through and numpy refused, or an arena the client sealed
        # against our mapping it again: still this request's error, on its id, and the
        # connection (framing intact) stays open.
        raise errors.Malformed(f"request {rid} could not be read: {exc}", request_id=rid) from None


def _parse_fields(rid: int, msg: dict[str, Any], ops: frozenset[str],
                  arena: ArenaView | None) -> Request:
    if not _is_int(msg.get("v")) or msg.get("v") != PROTOCOL_VERSION:  # not 1.0, not true
        raise errors.Malformed(
            f"protocol version {brief(msg.get('v'))} not supported; this server speaks "
            f"version {PROTOCOL_VERSION}"
        )
    op = msg.get("op")
    if not isinstance(op, str):
        raise errors.Malformed(f"op must be a str, got {brief(op)}")
    if op not in ops:
        raise errors.UnsupportedOp(f"unsupported op {brief(op)}; supported: {sorted(ops)}")
    model = msg.get("model")
    if op == "infer" and not isinstance(model, str):
        raise errors.Malformed(f"infer needs a model name (str), got {brief(model)}")
    if model is not None and not isinstance(model, str):
        raise errors.Malformed(f"model must be a str, got {brief(model)}")
    version = msg.get("version")
    if version is not None and (not _is_int(version) or version < 0):
        raise errors.Malformed(f"version must be a non-negative int, got {brief(version)}")
    outputs = msg.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
    ):
        raise errors.Malformed(f"outputs must be a list of str or nil, got {brief(outputs)}")
    raw_inputs = msg.get("inputs")
    if raw_inputs is None and op == "infer":
        raise errors.Malformed("infer needs inputs")
    inputs = _parse_inputs(raw_inputs, arena) if raw_inputs is not None else {}
    return Request(rid, op, model, inputs, outputs, version, msg, _parse_out(msg.get("out"), arena))


def _parse_out(out: object, arena: ArenaView | None) -> tuple[int, int] | None:
    if out is None:
        return None
    if not (isinstance(out, list) and len(out) == 2 and all(_is_int(v) and v >= 0 for v in out)):
        raise errors.Malformed(f"out must be [offset, nbytes] of non-negative ints, got {brief(out)}")
    if arena is None:
        raise errors.Malformed("out names an arena region, but this connection has no arena")
    arena.view(out[0], out[1])  # checked against the arena now, like the inputs, not after the run
    return out[0], out[1]


def _parse_inputs(raw: object, arena: ArenaView | None) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise errors.Malformed(f"inputs must be a map, got {type(raw).__name__}")
    inputs: dict[str, np.ndarray] = {}
    for name, tensor in raw.items():
        if not isinstance(name, str):
            raise errors.Malformed(f"input names must be str, got {brief(name)}")
        try:
            inputs[name] = tensor_from_wire(tensor, arena)
        except errors.RemoteError as exc:
            exc.message = f"input {brief(name)}: {exc.message}"
            exc.args = (exc.message,)
            raise
    return inputs


def make_request(request_id: int, op: str, **fields: object) -> dict[str, Any]:
    """Build a request map; None fields are left out and ``inputs`` arrays become tensors."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    for key, value in fields.items():
        if value is None:
            continue
        if key == "inputs" and isinstance(value, Mapping):
            value = {
                name: tensor_to_wire(np.asarray(arr), f"input {name!r}")
                for name, arr in value.items()
            }
        msg[key] = value
    return msg


# --- responses ------------------------------------------------------------------------------


def ok_result(request_id: int, **fields: object) -> dict[str, Any]:
    """A success response carrying op-specific ``fields`` (the control socket's ops use this)."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}


class OutputPlacer(Protocol):
    """Puts outputs into a client's arena region: ``shmcache.arena.WorkerArena``."""

    def place(self, arrays: list[np.ndarray], out: tuple[int, int]) -> list[int | None]: ...


def ok_infer(
    request_id: int, version: int, outputs: Iterable[tuple[str, np.ndarray]],
    compute: float | None = None, arena: OutputPlacer | None = None,
    out: tuple[int, int] | None = None, max_frame: int | None = None,
) -> dict[str, Any]:
    """Success for ``infer``: outputs in the order the client asked for them, and how long
    the model ran (``compute`` seconds) when the worker measured it.  With an ``arena`` and
    the request's ``out`` region, outputs that fit are copied there and sent as ``shm``.
    ``max_frame``: refuse (``FrameTooLarge``) outputs whose inline bytes would exceed it, before
    packing them (an output asked for 1000 times over would otherwise be packed 1000 times)."""
    named = [(name, *wire_array(np.asarray(arr), f"output {name!r} (ask for the other outputs "
                                "by name)")) for name, arr in outputs]
    offsets: list[int | None] = [None] * len(named)
    if arena is not None and out is not None:
        offsets = arena.place([arr for _, _, arr in named], out)
    inline = sum(arr.nbytes for (_, _, arr), off in zip(named, offsets) if off is None)
    if max_frame is not None and inline > max_frame:
        raise errors.FrameTooLarge(
            f"the outputs asked for come to {inline} bytes, more than max_frame={max_frame}; "
            "ask for fewer outputs or a smaller batch")
    wire = [[name, tensor_ref(dtype, arr.shape, off, arr.nbytes) if off is not None
             else _inline_tensor(dtype, arr)]
            for (name, dtype, arr), off in zip(named, offsets)]
    timing = {} if compute is None else {"compute": compute}
    return ok_result(request_id, version=version, outputs=wire, **timing)


def compute_of(msg: dict[str, Any]) -> float | None:
    """The ``compute`` seconds of an infer response; None when absent or not a sane number."""
    value = msg.get("compute")
    if type(value) is not float or not 0.0 <= value < math.inf:
        return None
    return value


def ok_models(request_id: int, models: list[dict[str, Any]]) -> dict[str, Any]:
    """Success for ``models``: one map per model, as documented at the top of this module."""
    return ok_result(request_id, models=models)


def ok_ping(request_id: int, ready: bool, **info: object) -> dict[str, Any]:
    """Success for ``ping``; ``pid`` defaults to the answering process."""
    info.setdefault("pid", os.getpid())
    return ok_result(request_id, ready=ready, **info)


def error_reply(request_id: int | None, exc: BaseException) -> dict[str, Any]:
    """An error response: a RemoteError keeps its code, anything else is ``internal``."""
    if isinstance(exc, errors.RemoteError):
        code, message = exc.code, exc.message
    else:
        code, message = errors.Internal.code, f"{type(exc).__name__}: {exc}"
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }


def check_reply(msg: dict[str, Any]) -> dict[str, Any]:
    """Return a success response unchanged, or raise the error class its code names."""
    if msg.get("ok") is True:
        return msg
    err = msg.get("error")
    rid = msg.get("id") if _is_int(msg.get("id")) else None
    if not isinstance(err, dict):
        raise errors.Malformed(f"response is neither ok nor an error: {brief(msg)}")
    code, message = err.get("code"), err.get("message")
    raise errors.error_from_code(str(code), str(message), rid)


def outputs_from_reply(msg: dict[str, Any], arena: ArenaView | None = None) -> list[np.ndarray]:
    """The output arrays of a successful infer response, in wire order (``shm`` outputs are
    read from ``arena``)."""
    pairs = msg.get("outputs")
    if not isinstance(pairs, list):
        raise errors.Malformed("infer response has no outputs list")
    out: list[np.ndarray] = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise errors.Malformed(f"output entry must be [name, tensor], got {brief(pair)}")
        out.append(tensor_from_wire(pair[1], arena))
    return out
