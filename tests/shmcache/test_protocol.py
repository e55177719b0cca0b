"""Wire protocol: tensors, framing under any chunking, hostile input, request validation."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache import errors, protocol

DTYPES = sorted(protocol.ALLOWED_DTYPES)


def roundtrip(arr: np.ndarray) -> np.ndarray:
    """Through a real frame: pack, decode, parse as an infer request."""
    frame = protocol.encode_frame(protocol.make_request(5, "infer", model="m", inputs={"x": arr}))
    (msg,) = protocol.FrameDecoder().feed(frame)
    return protocol.parse_request(msg).inputs["x"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3), (1, 1, 1, 5)])
def test_tensor_roundtrip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    arr = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    out = roundtrip(arr)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_big_endian_and_non_contiguous_are_converted() -> None:
    arr = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::3]
    wire = protocol.tensor_to_wire(arr)
    assert wire["dtype"] == "int32"
    assert bytes(wire["data"]) == np.ascontiguousarray(arr).astype("<i4").tobytes()
    np.testing.assert_array_equal(roundtrip(arr), arr)


def test_decoded_tensor_is_a_view_of_the_frame_bytes() -> None:
    out = protocol.tensor_from_wire({"dtype": "float32", "shape": [2], "data": b"\0" * 8})
    assert not out.flags.owndata and not out.flags.writeable


def test_contiguous_little_endian_tensor_is_not_copied_before_packing() -> None:
    arr = np.zeros(1000, np.float32)
    data = protocol.tensor_to_wire(arr)["data"]
    assert np.shares_memory(np.frombuffer(data, np.uint8), arr)


@pytest.mark.parametrize(
    ("tensor", "exc"),
    [
        ({"dtype": "complex64", "shape": [1], "data": b"\0" * 8}, errors.BadDtype),
        ({"dtype": "object", "shape": [1], "data": b"\0" * 8}, errors.BadDtype),
        ({"dtype": "float32", "shape": [3], "data": b"\0" * 8}, errors.BadShape),
        ({"dtype": "float32", "shape": [-2, -1], "data": b"\0" * 8}, errors.BadShape),
        ({"dtype": "float32", "shape": [2**62, 2**62], "data": b""}, errors.BadShape),
        # zero bytes match, but numpy cannot make an array of these dims
        ({"dtype": "float32", "shape": [2**40, 2**40, 0], "data": b""}, errors.BadShape),
        ({"dtype": "uint8", "shape": [2**63, 0, 48], "data": b""}, errors.BadShape),
        ({"dtype": "int64", "shape": [0, 2**64 - 1, 48], "data": b""}, errors.BadShape),
        ({"dtype": "float32", "shape": [1] * 33, "data": b"\0" * 4}, errors.BadShape),
        ({"dtype": "float32", "shape": [True], "data": b"\0" * 4}, errors.BadShape),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, errors.Malformed),
        ([1, 2], errors.Malformed),
    ],
)
def test_bad_tensors_raise_typed_errors(tensor: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        protocol.tensor_from_wire(tensor)


def test_unsupported_dtype_refused_on_encode() -> None:
    with pytest.raises(errors.BadDtype):
        protocol.tensor_to_wire(np.zeros(2, np.complex64))


# --- framing --------------------------------------------------------------------------------

MESSAGES = [
    protocol.make_request(1, "ping"),
    protocol.make_request(2, "infer", model="m", inputs={"x": np.arange(10, dtype=np.int64)}),
    protocol.ok_infer(3, 4, [("y", np.ones((2, 2), np.float16))]),
    protocol.error_reply(4, errors.UnknownModel("nope")),
]


def test_decoder_fed_one_byte_at_a_time() -> None:
    frames = [protocol.encode_frame(m) for m in MESSAGES]
    boundaries = {sum(len(f) for f in frames[: k + 1]) for k in range(len(frames))}
    stream = b"".join(frames)
    decoder = protocol.FrameDecoder()
    got: list[dict] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert (decoder.pending() == 0) == (i + 1 in boundaries)
    assert [m["id"] for m in got] == [1, 2, 3, 4]
    assert decoder.pending() == 0
    np.testing.assert_array_equal(protocol.parse_request(got[1]).inputs["x"], np.arange(10))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200))
def test_decoder_any_chunking(cuts: list[int]) -> None:
    stream = b"".join(protocol.encode_frame(m) for m in MESSAGES) * 2
    decoder = protocol.FrameDecoder()
    got: list[dict] = []
    pos = 0
    for cut in cuts:
        got += decoder.feed(stream[pos : pos + cut])
        pos += cut
    got += decoder.feed(stream[pos:])
    assert [m["id"] for m in got] == [1, 2, 3, 4] * 2
    assert decoder.pending() == 0


def test_oversize_header_refused_before_body() -> None:
    decoder = protocol.FrameDecoder(max_frame=1000)
    assert decoder.feed(protocol.HEADER.pack(999)[:3]) == []
    decoder2 = protocol.FrameDecoder(max_frame=1000)
    with pytest.raises(errors.FrameTooLarge):
        decoder2.feed(protocol.HEADER.pack(1001))  # header alone, no body sent
    with pytest.raises(errors.Malformed):
        decoder2.feed(b"x")  # unusable after an error, like msgpack's Unpacker


def test_default_max_frame_refuses_huge_declared_length() -> None:
    with pytest.raises(errors.FrameTooLarge):
        protocol.FrameDecoder().feed(struct.pack(">I", protocol.DEFAULT_MAX_FRAME + 1))


def test_zero_length_frame_is_malformed() -> None:
    with pytest.raises(errors.Malformed):
        protocol.FrameDecoder().feed(b"\0\0\0\0")


def frame_of(body: bytes) -> bytes:
    return protocol.HEADER.pack(len(body)) + body


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb(7),
        b"\xc1",  # never-used msgpack byte
        b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion elements
        b"\xdf\xff\xff\xff\xff",  # map32 likewise
        b"\xc6\xff\xff\xff\xf0",  # bin32 declaring ~4 GiB
        msgpack.packb({"a": msgpack.ExtType(1, b"xx")}),  # ext refused
        msgpack.packb({1: 2}),  # non-str key
        b"\xa3\xff\xfe\xfd",  # invalid utf-8 str
        msgpack.packb({"a": 1}) + b"\x01",  # trailing bytes
        b"\x91" * 100000,  # nesting deeper than any stack
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(errors.Malformed) as info:
        protocol.FrameDecoder().feed(frame_of(body))
    assert not info.value.message.endswith((": )", ": ", "()"))  # it says what was wrong


@pytest.mark.parametrize("request_map", [
    {"inputs": {f"x{i}": {} for i in range(protocol.MAX_REQUEST_ITEMS + 1)}},
    {"outputs": ["y"] * (protocol.MAX_REQUEST_ITEMS + 1)},
    {"model": "m" * (protocol.MAX_REQUEST_STR + 1)},
])
def test_requests_are_held_to_tighter_limits_than_responses(request_map: dict) -> None:
    """A frame of millions of entries must not be built at all where requests are read; a
    response (read by a client, from its own worker) may be as long as max_frame allows."""
    frame = protocol.encode_frame({"v": 1, "id": 1, "op": "infer", **request_map})
    assert len(protocol.FrameDecoder().feed(frame)) == 1
    with pytest.raises(errors.Malformed):
        protocol.FrameDecoder(requests=True).feed(frame)
    at_limit = {k: (v[: protocol.MAX_REQUEST_STR] if isinstance(v, str)
                    else dict(list(v.items())[:-1]) if isinstance(v, dict) else v[:-1])
                for k, v in request_map.items()}
    ok = protocol.encode_frame({"v": 1, "id": 1, "op": "infer", **at_limit})
    assert len(protocol.FrameDecoder(requests=True).feed(ok)) == 1


def test_errors_quote_at_most_a_little_of_what_was_sent() -> None:
    with pytest.raises(errors.Malformed) as info:
        protocol.parse_request({"v": 1, "id": 3, "op": "infer", "model": "m", "inputs": {},
                                "outputs": [1] * 100_000})
    assert len(info.value.message) < 400 and "characters)" in info.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_random_bodies_decode_or_raise_malformed(body: bytes) -> None:
    try:
        msgs = protocol.FrameDecoder().feed(frame_of(body))
    except errors.Malformed:
        return
    assert all(isinstance(m, dict) for m in msgs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_streams_never_raise_untyped(stream: bytes) -> None:
    decoder = protocol.FrameDecoder(max_frame=4096)
    try:
        for msg in decoder.feed(stream):
            protocol.parse_request(msg)
    except (errors.Malformed, errors.FrameTooLarge, errors.UnsupportedOp, errors.BadDtype, errors.BadShape):
        pass


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "id", "op", "model", "inputs", "outputs", "version", "x"]), JSONISH
    )
)
def test_wrongly_typed_requests_raise_typed_errors(msg: dict) -> None:
    try:
        protocol.parse_request(msg)
    except (errors.Malformed, errors.UnsupportedOp, errors.BadDtype, errors.BadShape):
        pass


# --- requests -------------------------------------------------------------------------------


def test_truncated_frame_stays_pending() -> None:
    frame = protocol.encode_frame(MESSAGES[1])
    decoder = protocol.FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending() == len(frame) - 1


@pytest.mark.parametrize(
    ("msg", "exc"),
    [
        ({"v": 2, "id": 9, "op": "ping"}, errors.Malformed),
        ({"v": 1.0, "id": 9, "op": "ping"}, errors.Malformed),  # equal to 1, not an int
        ({"v": True, "id": 9, "op": "ping"}, errors.Malformed),
        ({"v": 1, "id": 9}, errors.Malformed),
        ({"v": 1, "id": 9, "op": "fly"}, errors.UnsupportedOp),
        ({"v": 1, "id": 9, "op": "infer", "inputs": {}}, errors.Malformed),
        ({"v": 1, "id": 9, "op": "infer", "model": "m"}, errors.Malformed),
        ({"v": 1, "id": 9, "op": "infer", "model": "m", "inputs": {"x": {"dtype": "str", "shape": [], "data": b""}}}, errors.BadDtype),
        ({"v": 1, "id": 9, "op": "infer", "model": "m", "inputs": {"x": {"dtype": "int8", "shape": [2], "data": b""}}}, errors.BadShape),
        ({"v": 1, "id": 9, "op": "infer", "model": "m", "inputs": {}, "outputs": "y"}, errors.Malformed),
        ({"v": 1, "id": 9, "op": "infer", "model": "m", "inputs": {}, "version": True}, errors.Malformed),
    ],
)
def test_parse_request_errors_carry_the_id(msg: dict, exc: type[errors.RemoteError]) -> None:
    with pytest.raises(exc) as info:
        protocol.parse_request(msg)
    assert info.value.request_id == 9
    if msg.get("v") == 2:
        assert "version" in info.value.message


@pytest.mark.parametrize("rid", [None, -1, 2**63, "7", True, 1.5])
def test_unusable_id_is_frame_level_malformed(rid: object) -> None:
    with pytest.raises(errors.Malformed) as info:
        protocol.parse_request({"v": 1, "id": rid, "op": "ping"})
    assert info.value.request_id is None


def test_extra_ops_for_the_control_socket() -> None:
    msg = protocol.make_request(3, "publish", model="m", path="/x.onnx")
    with pytest.raises(errors.UnsupportedOp):
        protocol.parse_request(msg)
    req = protocol.parse_request(msg, ops=frozenset({"status", "publish"}))
    assert (req.op, req.model, req.raw["path"]) == ("publish", "m", "/x.onnx")


def test_responses() -> None:
    assert protocol.ok_ping(1, True)["pid"] > 0
    assert protocol.ok_result(2, workers=3) == {"v": 1, "id": 2, "ok": True, "workers": 3}
    err = protocol.error_reply(5, KeyError("boom"))
    assert err["error"]["code"] == "internal" and "KeyError" in err["error"]["message"]
    for code, cls in errors.ERROR_CLASSES.items():
        with pytest.raises(cls):
            protocol.check_reply(protocol.error_reply(5, cls("m")))
        assert protocol.error_reply(5, cls("m"))["error"]["code"] == code


def test_infer_reply_carries_compute_seconds_when_given() -> None:
    out = [("y", np.ones(2, np.float32))]
    assert "compute" not in protocol.ok_infer(1, 2, out)
    reply = protocol.decode_body(protocol.encode_frame(protocol.ok_infer(1, 2, out, 0.25))[4:])
    assert protocol.compute_of(reply) == 0.25
    for bad in (None, 1, True, -0.5, float("nan"), float("inf"), "0.1"):
        assert protocol.compute_of({"compute": bad}) is None
