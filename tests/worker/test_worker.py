"""A real worker process on real segments and a real Unix socket: fidelity, errors, load, fuzz."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmcache
from onnx import TensorProto

from shmcache import errors, protocol
from shmcache.errors import ModelError
from shmcache.registry import segment_name
from shmcache.state import ConnectionBoard
from tests import models
from tests.worker.harness import WorkerProcess, build_segment, running_worker
from worker.runtime import SessionSettings
from worker.server import ACCEPT_STEP, Acceptor

RNG = np.random.default_rng(11)


def reference(path: Path, prepacked: bool = False) -> ort.InferenceSession:
    """An in-process session with exactly the worker's session options (pre-packing on when
    the worker's segment carries pre-packed weights, off when it does not)."""
    return ort.InferenceSession(str(path), SessionSettings(intra_op_threads=1).options(prepacked),
                                providers=["CPUExecutionProvider"])


FIDELITY_CASES = {
    "mlp_matmul": (models.mlp((32, 64, 16), seed=21),
                   lambda: {"x": RNG.standard_normal((7, 32)).astype(np.float32)}),
    "mlp_gemm": (models.mlp((32, 48, 8), seed=22, gemm=True),
                 lambda: {"x": RNG.standard_normal((3, 32)).astype(np.float32)}),
    "convnet": (models.convnet(),
                lambda: {"img": RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)}),
    "multi_io": (models.multi_io(),
                 lambda: {"a": RNG.standard_normal((2, 5, 6)).astype(np.float32),
                          "b": RNG.standard_normal((2, 5, 4)).astype(np.float32)}),
    "unranked": (models.unranked(),
                 lambda: {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}),
    "overridable": (models.overridable(),
                    lambda: {"x": RNG.standard_normal((3, 4)).astype(np.float32),
                             "scale": RNG.standard_normal(4).astype(np.float32)}),
    "overridable_default": (models.overridable(),
                            lambda: {"x": RNG.standard_normal((3, 4)).astype(np.float32)}),
    "ir3_shared_constants": (models.ir3_shared_constants(),
                             lambda: {"x": RNG.standard_normal((3, 4)).astype(np.float32)}),
    "int_and_half": (models.int_and_half(),
                     lambda: {"ints": RNG.integers(-100, 100, (4, 5), dtype=np.int32),
                              "halves": RNG.standard_normal((4, 5)).astype(np.float16)}),
}


@pytest.fixture(scope="module")
def fidelity_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("fidelity")
    paths = {name: models.save(model, tmp / f"{name}.onnx")
             for name, (model, _) in FIDELITY_CASES.items()}
    with running_worker(tmp, paths) as worker:
        yield worker, paths


@pytest.fixture(scope="module")
def prepacked_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("prepacked")
    paths = {name: models.save(model, tmp / f"{name}.onnx")
             for name, (model, _) in FIDELITY_CASES.items()}
    with running_worker(tmp, paths, prepack=True) as worker:
        yield worker, paths


@pytest.mark.parametrize("case", sorted(FIDELITY_CASES))
def test_prepacked_outputs_bit_identical_to_in_process(
    prepacked_worker: tuple[WorkerProcess, dict[str, Path]], case: str
) -> None:
    worker, paths = prepacked_worker
    feed = FIDELITY_CASES[case][1]()
    expected = reference(paths[case], prepacked=True).run(None, feed)
    with shmcache.Client(str(worker.socket_path)) as client:
        got = client.run(case, None, feed)
    assert [(g.dtype, g.shape, g.tobytes()) for g in got] == \
        [(e.dtype, e.shape, e.tobytes()) for e in expected]


@pytest.mark.parametrize("case", sorted(FIDELITY_CASES))
def test_outputs_bit_identical_to_in_process(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]], case: str
) -> None:
    worker, paths = fidelity_worker
    feed = FIDELITY_CASES[case][1]()
    expected = reference(paths[case]).run(None, feed)
    with shmcache.Client(str(worker.socket_path)) as client:
        got, version = client.run_with_version(case, None, feed)
    assert version == 1
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert g.tobytes() == e.tobytes()


def test_output_subset_in_asked_order(fidelity_worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    worker, paths = fidelity_worker
    feed = FIDELITY_CASES["multi_io"][1]()
    expected = reference(paths["multi_io"]).run(["half", "best"], feed)
    with shmcache.Client(str(worker.socket_path)) as client:
        got = client.run("multi_io", ["half", "best"], feed)
    assert [g.tobytes() for g in got] == [e.tobytes() for e in expected]


def test_models_lists_signatures(fidelity_worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    worker, _ = fidelity_worker
    with shmcache.Client(str(worker.socket_path)) as client:
        listed = {m.name: m for m in client.models()}
    assert set(listed) == set(FIDELITY_CASES)
    multi = listed["multi_io"]
    assert multi.version == 1
    assert [(t.name, t.dtype, list(t.shape)) for t in multi.inputs] == [
        ("a", "float32", ["batch", "seq", 6]), ("b", "float32", ["batch", "seq", 4])]
    assert [t.dtype for t in multi.outputs] == ["float32", "int64", "float16"]
    # declared without a shape: any rank (ORT lists [] for it, as for a scalar)
    assert [(t.name, t.shape) for t in listed["unranked"].inputs] == [("x", None)]
    # an initializer a call may feed: listed apart, as onnxruntime lists it
    over = listed["overridable"]
    assert [t.name for t in over.inputs] == ["x"]
    assert [(t.name, t.dtype, t.shape) for t in over.overridable] == [("scale", "float32", [4])]
    assert multi.overridable == []


def test_a_list_fed_for_an_overridable_initializer_takes_its_dtype(
        fidelity_worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    """As onnxruntime converts it: a list of Python floats for ``scale`` is float32, not the
    float64 numpy makes of it (which the worker refuses as bad_dtype)."""
    worker, paths = fidelity_worker
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    scale = [0.5, -1.0, 2.0, 0.25]
    with shmcache.Client(str(worker.socket_path)) as client:
        (got,) = client.run("overridable", None, {"x": x, "scale": scale})
    session = ort.InferenceSession(str(paths["overridable"]), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": x, "scale": np.array(scale, np.float32)})
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_string_tensors_get_errors_that_name_them(tmp_path: Path) -> None:
    """The wire carries numbers and bools only: a string output is refused by name (the other
    outputs still come when asked for), and a string input is refused before it is sent."""
    path = models.save(models.with_strings(), tmp_path / "s.onnx")
    x = np.arange(3, dtype=np.float32)
    with running_worker(tmp_path, {"s": path}) as worker, \
            shmcache.Client(str(worker.socket_path)) as client:
        with pytest.raises(errors.BadDtype, match="output 'ys'"):
            client.run("s", None, {"x": x})
        (y,) = client.run("s", ["y"], {"x": x})
        assert y.tolist() == [1.0, 2.0, 3.0]
        with pytest.raises(errors.BadDtype, match="input 'x' has dtype <U1 \\(strings"):
            client.run("s", None, {"x": np.array(["a", "b"])})
        assert client.ping()["ready"] is True


@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "pre-packed"])
def test_small_string_initializers_stay_in_the_graph(tmp_path: Path, prepack: bool) -> None:
    """A segment holds no strings; a few labels stay in the graph (plain segments refused
    the whole model for them: --optimization disabled could not serve it)."""
    path = models.save(models.labelled(), tmp_path / "l.onnx")
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    with running_worker(tmp_path, {"l": path}, prepack=prepack) as worker, \
            shmcache.Client(str(worker.socket_path)) as client:
        (y,) = client.run("l", ["y"], {"x": x})
    want = ort.InferenceSession(str(path), SessionSettings().options(prepacked=prepack),
                                providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert y.tobytes() == want.tobytes()


def test_float8_weights_are_served_and_int4_refused_by_name(tmp_path: Path) -> None:
    """8-bit floats are one byte an element in ONNX and numpy alike; INT4 packs two to a
    byte, and is refused when the segment is built (it used to pass, and every worker then
    failed to read the segment: a boot loop)."""
    f8 = models.save(models.quantized(TensorProto.FLOAT8E4M3FN), tmp_path / "f8.onnx")
    feed = {"x": RNG.standard_normal((3, 128)).astype(np.float32),
            "scale": np.array(0.05, np.float32)}
    want = ort.InferenceSession(str(f8), SessionSettings().options(prepacked=True),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with running_worker(tmp_path, {"f8": f8}, prepack=True) as worker, \
            shmcache.Client(str(worker.socket_path)) as client:
        assert client.run("f8", None, feed)[0].tobytes() == want.tobytes()
    int4 = models.save(models.quantized(TensorProto.INT4), tmp_path / "int4.onnx")
    for prepack in (False, True):
        with pytest.raises(ModelError, match="INT4 cannot be held"):
            (tmp_path / str(prepack)).mkdir()
            build_segment(int4, segment_name("test", "q", 1), "q", tmp_path / str(prepack),
                          prepack, "all")


def test_an_index_out_of_range_is_the_model_failing_not_a_bad_shape(tmp_path: Path) -> None:
    """ORT reports a node refusing its values as InvalidArgument, like its own input checks:
    "while running" tells them apart."""
    path = models.save(models.embedding(), tmp_path / "e.onnx")
    with running_worker(tmp_path, {"e": path}) as worker, \
            shmcache.Client(str(worker.socket_path)) as client:
        (y,) = client.run("e", None, {"ids": np.array([0, 9], np.int64)})
        assert y.shape == (2, 4)
        with pytest.raises(errors.ModelFailed, match="Gather"):
            client.run("e", None, {"ids": np.array([0, 10], np.int64)})
        with pytest.raises(errors.BadDtype):
            client.run("e", None, {"ids": np.array([0], np.int32)})
        assert client.ping()["ready"] is True


ERROR_CASES = [
    (errors.UnknownModel, dict(model="nope", inputs={"x": np.zeros((1, 32), np.float32)})),
    (errors.UnknownInput, dict(model="mlp_matmul", inputs={"x": np.zeros((1, 32), np.float32),
                                                           "extra": np.zeros(1, np.float32)})),
    (errors.MissingInput, dict(model="multi_io", inputs={"a": np.zeros((1, 1, 6), np.float32)})),
    (errors.BadDtype, dict(model="mlp_matmul", inputs={"x": np.zeros((1, 32), np.float64)})),
    (errors.BadDtype, dict(model="unranked", inputs={"x": np.zeros((2, 8), np.float64)})),
    # any rank passes the signature; MatMul by 8x4 refuses 5 columns when it runs
    (errors.ModelFailed, dict(model="unranked", inputs={"x": np.zeros((2, 5), np.float32)})),
    (errors.BadShape, dict(model="mlp_matmul", inputs={"x": np.zeros((1, 31), np.float32)})),
    (errors.BadShape, dict(model="mlp_matmul", inputs={"x": np.zeros((32,), np.float32)})),
    (errors.BadShape, dict(model="multi_io", inputs={"a": np.zeros((1, 2, 6), np.float32),
                                                     "b": np.zeros((1, 3, 4), np.float32)})),
    (errors.UnknownOutput, dict(model="mlp_matmul", inputs={"x": np.zeros((1, 32), np.float32)},
                                outputs=["nope"])),
    (errors.NotFound, dict(model="mlp_matmul", inputs={"x": np.zeros((1, 32), np.float32)},
                           version=99)),
]


@pytest.mark.parametrize("exc, fields", ERROR_CASES, ids=[c[0].code for c in ERROR_CASES])
def test_bad_requests_get_typed_errors_and_worker_keeps_serving(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]], exc: type[Exception], fields: dict
) -> None:
    worker, _ = fidelity_worker
    with shmcache.Client(str(worker.socket_path)) as client:
        with pytest.raises(exc):
            client.request("infer", **fields)
        assert client.ping()["ready"] is True
    assert worker.proc.poll() is None


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def read_reply(sock: socket.socket) -> dict | None:
    decoder = protocol.FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        msgs = decoder.feed(data)
        if msgs:
            return msgs[0]


def test_unsupported_op_keeps_connection(fidelity_worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    worker, _ = fidelity_worker
    with raw_connect(worker.socket_path) as sock:
        sock.sendall(protocol.encode_frame(protocol.make_request(5, "explode")))
        reply = read_reply(sock)
        assert reply is not None and reply["id"] == 5 and reply["error"]["code"] == "unsupported_op"
        sock.sendall(protocol.encode_frame(protocol.make_request(6, "ping")))
        reply = read_reply(sock)
        assert reply is not None and reply["ok"] and reply["id"] == 6


def test_a_half_sent_request_is_given_up_after_the_stall_timeout(tmp_path: Path) -> None:
    """A client that stops in the middle of a frame loses its connection after stall_timeout
    (the partial frame held worker memory for nothing); one that is slow but keeps sending is
    answered, and nobody else notices."""
    path = models.save(models.echo(), tmp_path / "echo.onnx")
    x = np.arange(60_000, dtype=np.float32)  # 240 KB inline: a frame the worker reads in parts
    frame = protocol.encode_frame(protocol.make_request(
        1, "infer", model="echo", inputs={"x": x}))
    step = len(frame) // 8 + 1
    with running_worker(tmp_path, {"echo": path}, stall_timeout=0.5) as worker:
        with raw_connect(worker.socket_path) as slow:  # 1.6 s in all, never 0.5 s idle
            for at in range(0, len(frame), step):
                slow.sendall(frame[at:at + step])
                time.sleep(0.2)
            reply = read_reply(slow)
            assert reply is not None and reply["ok"] and reply["id"] == 1
        with raw_connect(worker.socket_path) as stalled:
            stalled.sendall(frame[:len(frame) // 2])
            started = time.monotonic()
            reply = read_reply(stalled)
            waited = time.monotonic() - started
            assert reply is not None and reply["id"] is None
            assert reply["error"]["code"] == "malformed" and "incomplete" in reply["error"]["message"]
            assert 0.4 <= waited < 5
            assert stalled.recv(1) == b""  # closed
        with shmcache.Client(str(worker.socket_path)) as client:
            assert np.array_equal(client.run("echo", None, {"x": x})[0], x)


@pytest.mark.parametrize("shape", [[2**40, 2**40, 0], [2**63, 0, 48], [0, 2**64 - 1, 48]])
def test_hostile_empty_shape_is_answered_on_its_id(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]], shape: list[int]
) -> None:
    """Zero bytes pass the size check, yet numpy cannot hold these dims: a bad_shape reply on
    the request's id, and the connection stays open."""
    worker, _ = fidelity_worker
    request = protocol.make_request(4, "infer", model="mlp_matmul")
    request["inputs"] = {"x": {"dtype": "float32", "shape": shape, "data": b""}}
    with raw_connect(worker.socket_path) as sock:
        sock.sendall(protocol.encode_frame(request))
        reply = read_reply(sock)
        assert reply is not None and reply["id"] == 4 and reply["error"]["code"] == "bad_shape"
        sock.sendall(protocol.encode_frame(protocol.make_request(5, "ping")))
        assert (read_reply(sock) or {}).get("id") == 5


@pytest.mark.parametrize("frame, code", [
    (struct.pack(">I", protocol.DEFAULT_MAX_FRAME + 1), "frame_too_large"),
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "malformed"),  # 0xc1 is never valid msgpack
    (struct.pack(">I", 2) + msgpack.packb([1]), "malformed"),  # not a map
])
def test_malformed_frames_close_only_that_connection(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]], frame: bytes, code: str
) -> None:
    worker, _ = fidelity_worker
    with raw_connect(worker.socket_path) as bystander, raw_connect(worker.socket_path) as sock:
        sock.sendall(frame)
        reply = read_reply(sock)
        assert reply is not None and reply["error"]["code"] == code
        assert sock.recv(1) == b""  # closed by the worker
        bystander.sendall(protocol.encode_frame(protocol.make_request(1, "ping")))
        assert (read_reply(bystander) or {}).get("ok") is True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda n, tail: struct.pack(">I", n) + tail,
              st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda obj: protocol.encode_frame(obj) if isinstance(obj, dict) else
              struct.pack(">I", len(msgpack.packb(obj))) + msgpack.packb(obj),
              st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) |
                           st.text(max_size=8) | st.binary(max_size=16),
                           lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.sampled_from(["v", "id", "op", "model", "inputs",
                                                            "outputs", "version", "dtype",
                                                            "shape", "data", "x"]), inner,
                                           max_size=6), max_leaves=20)),
))
def test_fuzzed_frames_never_hurt_the_worker(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]], junk: bytes
) -> None:
    worker, _ = fidelity_worker
    with raw_connect(worker.socket_path) as sock:
        sock.settimeout(0.2)
        sock.sendall(junk)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    with raw_connect(worker.socket_path) as check:
        check.sendall(protocol.encode_frame(protocol.make_request(9, "ping")))
        assert (read_reply(check) or {}).get("ok") is True
    assert worker.proc.poll() is None


@pytest.fixture(scope="module")
def busy_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("busy")
    paths = {"slow": models.save(models.slow(), tmp / "slow.onnx"),
             "echo": models.save(models.echo(), tmp / "echo.onnx")}
    with running_worker(tmp, paths, max_inflight=4) as worker:
        yield worker, paths["slow"]


def slow_feed(batch: int = 64) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((batch, 768)).astype(np.float32)}


def test_pipelined_requests_on_one_connection(busy_worker: tuple[WorkerProcess, Path]) -> None:
    worker, path = busy_worker
    ref = reference(path)

    async def main() -> None:
        async with shmcache.AsyncClient(str(worker.socket_path)) as client:
            feeds = [slow_feed(2) for _ in range(4)]
            results = await asyncio.gather(*(client.run("slow", None, f) for f in feeds))
            for feed, got in zip(feeds, results):
                assert got[0].tobytes() == ref.run(None, feed)[0].tobytes()

    asyncio.run(main())


def test_overload_is_refused_at_once_not_queued(busy_worker: tuple[WorkerProcess, Path]) -> None:
    """Ten connections, one call each, on a worker that takes four at a time: the rest are
    refused (overloaded), not queued."""
    worker, _ = busy_worker
    results: list[object] = []
    all_connected = threading.Barrier(10)

    def one_call() -> None:
        with shmcache.Client(str(worker.socket_path), timeout=60) as client:
            client.ping()  # connected (accepting is paced), then all call at once
            all_connected.wait(60)
            try:
                results.append(client.run("slow", None, slow_feed()))
            except errors.Overloaded as exc:
                results.append(exc)

    threads = [threading.Thread(target=one_call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [r for r in results if isinstance(r, errors.Overloaded)]
    served = [r for r in results if isinstance(r, list)]
    assert len(refused) >= 1 and len(served) >= 4
    assert len(refused) + len(served) == 10


class RawClient:
    """A client speaking the protocol by hand: pipelines frames, reads replies in order."""

    def __init__(self, path: Path) -> None:
        self.sock = raw_connect(path)
        self.sock.settimeout(60)
        self.decoder = protocol.FrameDecoder()
        self.pending: list[dict] = []

    def send(self, *requests: dict) -> None:
        self.sock.sendall(b"".join(protocol.encode_frame(r) for r in requests))

    def send_in_background(self, *requests: dict) -> threading.Thread:
        """For more than the socket buffers hold: the worker reads on only as we read."""
        sender = threading.Thread(target=self.send, args=requests, daemon=True)
        sender.start()
        return sender

    def reply(self) -> dict | None:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def test_one_pipelining_connection_waits_its_turn(busy_worker: tuple[WorkerProcess, Path]) -> None:
    """Twelve requests pipelined on one connection are all served (none refused: the worker
    reads on as they finish), and a call from another client waits behind at most a few of
    them, not the whole pile."""
    worker, _ = busy_worker
    hog = RawClient(worker.socket_path)
    try:
        sender = hog.send_in_background(*(
            protocol.make_request(i, "infer", model="slow", inputs=slow_feed(256))
            for i in range(12)))
        answered = [hog.reply()]  # the worker is busy with the hog's requests now
        with shmcache.Client(str(worker.socket_path), timeout=60) as bystander:
            bystander.run("echo", None, {"x": np.ones(4, np.float32)})
        hog_answers_before = len(answered) + len(hog.pending)
        answered += [hog.reply() for _ in range(11)]
        sender.join(60)
    finally:
        hog.close()
    assert [r and r["ok"] for r in answered] == [True] * 12, answered
    assert sorted(r["id"] for r in answered if r) == list(range(12))
    assert hog_answers_before < 6  # without the per-connection bound: behind all 12 queued


def test_a_half_closed_connection_gets_every_answer(busy_worker: tuple[WorkerProcess, Path]) -> None:
    worker, _ = busy_worker
    client = RawClient(worker.socket_path)
    try:
        client.send(protocol.make_request(0, "ping"),
                    *(protocol.make_request(i, "infer", model="slow", inputs=slow_feed(8))
                      for i in range(1, 6)))
        client.sock.shutdown(socket.SHUT_WR)
        replies = [client.reply() for _ in range(6)]
        assert client.reply() is None  # then the worker closes
    finally:
        client.close()
    assert [r and (r["id"], r["ok"]) for r in replies] == [(i, True) for i in range(6)]


@pytest.mark.parametrize("request_map", [
    {"inputs": {f"x{i}": {"dtype": "float32", "shape": [0], "data": b""} for i in range(2000)}},
    {"outputs": ["y"] * 2000},
    {"model": "m" * 100_000},
], ids=["2000 inputs", "2000 outputs", "100 KB name"])
def test_a_request_beyond_the_protocol_limits_closes_only_its_connection(
    busy_worker: tuple[WorkerProcess, Path], request_map: dict
) -> None:
    """Millions of entries once held a worker's loop for 30 s (killed as hung): past
    MAX_REQUEST_ITEMS entries or MAX_REQUEST_STR bytes a frame is unreadable at once."""
    worker, _ = busy_worker
    hostile = RawClient(worker.socket_path)
    bystander = RawClient(worker.socket_path)
    try:
        hostile.send({**protocol.make_request(1, "infer", model="echo", inputs={}), **request_map})
        reply = hostile.reply()
        assert reply is not None and reply["error"]["code"] == "malformed" and reply["id"] is None
        assert len(reply["error"]["message"]) < 1000
        assert hostile.reply() is None
        bystander.send(protocol.make_request(2, "ping"))
        assert (bystander.reply() or {}).get("ok") is True
    finally:
        hostile.close()
        bystander.close()


def test_outputs_asked_for_over_and_over_are_refused_not_packed(
    busy_worker: tuple[WorkerProcess, Path]
) -> None:
    """ORT returns an output named 1000 times as 1000 arrays; packed inline they would make
    a frame of 1000 x its size. Past max_frame (272 MiB): frame_too_large on the id."""
    worker, _ = busy_worker
    x = np.ones(2**18, np.float32)  # 1 MiB out per name
    client = RawClient(worker.socket_path)
    try:
        client.send(protocol.make_request(3, "infer", model="echo", inputs={"x": x},
                                          outputs=["y"] * 300))
        reply = client.reply()
        assert reply is not None and reply["id"] == 3
        assert reply["error"]["code"] == "frame_too_large", reply["error"]
        client.send(protocol.make_request(4, "infer", model="echo", inputs={"x": x},
                                          outputs=["y"] * 3))
        reply = client.reply()
        assert reply is not None and reply["ok"] and len(reply["outputs"]) == 3
    finally:
        client.close()


def test_made_up_names_and_versions_are_counted_under_one_label(
    busy_worker: tuple[WorkerProcess, Path]
) -> None:
    """Request counts ride on the heartbeat: a client's made-up model names and versions must
    not each add a series (100k of them once cost a worker its supervisor)."""
    worker, _ = busy_worker
    client = RawClient(worker.socket_path)
    try:
        client.send(*(protocol.make_request(i, "infer", model=f"nope-{i}", inputs={})
                      for i in range(200)),
                    *(protocol.make_request(1000 + i, "infer", model="echo", version=50 + i,
                                            inputs={"x": np.ones(1, np.float32)})
                      for i in range(100)))
        codes = [(client.reply() or {}).get("error", {}).get("code") for _ in range(300)]
    finally:
        client.close()
    assert codes == ["unknown_model"] * 200 + ["not_found"] * 100
    deadline = time.monotonic() + 10
    while True:
        beat = worker.wait_for("beat")
        rows = beat["requests"]["requests"]
        if sum(n for _, _, code, n in rows if code == "not_found") >= 100 or \
                time.monotonic() > deadline:
            break
    labels = {(model, version) for model, version, _, _ in rows}
    assert ("", 0) in labels and ("echo", 0) in labels
    assert all(model in ("", "slow", "echo") and version in (0, 1) for model, version in labels)


def test_ping_answers_while_a_model_computes(busy_worker: tuple[WorkerProcess, Path]) -> None:
    worker, _ = busy_worker
    done = threading.Event()

    def keep_busy() -> None:
        with shmcache.Client(str(worker.socket_path), timeout=60) as busy:
            while not done.is_set():
                busy.run("slow", None, slow_feed(256))

    thread = threading.Thread(target=keep_busy)
    thread.start()
    try:
        with shmcache.Client(str(worker.socket_path)) as pinger:
            pinger.ping()
            single = time.perf_counter()
            with shmcache.Client(str(worker.socket_path)) as timing:
                timing.run("slow", None, slow_feed(256))
            one_inference = time.perf_counter() - single
            worst = 0.0
            for _ in range(20):
                start = time.perf_counter()
                assert pinger.ping()["ready"] is True
                worst = max(worst, time.perf_counter() - start)
        # A ping is not queued behind the requests: it waits at most for the run in progress
        # when that run is short enough for the loop thread (INLINE_BELOW), else not at all.
        assert worst < one_inference, (worst, one_inference)
    finally:
        done.set()
        thread.join(timeout=60)


def test_a_batch_far_larger_than_usual_runs_off_the_loop(
        busy_worker: tuple[WorkerProcess, Path]) -> None:
    """A run expected to be short may go on the worker's loop thread (two hand-offs saved);
    expected by the typical run scaled by the inputs' size, so one batch 4096x the usual is
    not taken for a short run: it goes to the pool, and pings are answered meanwhile."""
    worker, _ = busy_worker
    with shmcache.Client(str(worker.socket_path)) as small:
        for _ in range(30):  # the typical run: batch 1, well under INLINE_BELOW
            small.run("slow", None, slow_feed(1))
    took: list[float] = []

    def big_run() -> None:
        with shmcache.Client(str(worker.socket_path), timeout=60) as big:
            started = time.perf_counter()
            big.run("slow", None, slow_feed(4096))
            took.append(time.perf_counter() - started)

    with shmcache.Client(str(worker.socket_path)) as pinger:
        pinger.ping()
        thread = threading.Thread(target=big_run)
        thread.start()
        time.sleep(0.05)  # the big run under way
        worst = 0.0
        while thread.is_alive():
            start = time.perf_counter()
            pinger.ping()
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.01)
        thread.join()
    assert took and took[0] > 0.1, took  # long enough for a blocked loop to show
    assert worst < took[0] / 4, (worst, took)


def test_many_connections_from_threads(
    fidelity_worker: tuple[WorkerProcess, dict[str, Path]]
) -> None:
    worker, paths = fidelity_worker
    ref = reference(paths["mlp_matmul"])
    client = shmcache.Client(str(worker.socket_path), timeout=60)
    failures: list[BaseException] = []

    def one_thread(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                feed = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
                got = client.run("mlp_matmul", None, feed)[0]
                assert got.tobytes() == ref.run(None, feed)[0].tobytes()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=one_thread, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    client.close()
    assert failures == []


def test_an_output_the_wire_cannot_carry_is_an_error_on_that_call(tmp_path: Path) -> None:
    """Strings are not a wire dtype: building the reply fails after the run, on the loop
    thread or from the pool, and the call must still get its answer (an error)."""
    path = models.save(models.text_output(), tmp_path / "text.onnx")
    with running_worker(tmp_path, {"text": path}) as worker, \
            shmcache.Client(str(worker.socket_path), timeout=20) as client:
        for _ in range(4):  # the first may run on the loop; the next ones, ms each, in the pool
            with pytest.raises(errors.BadDtype, match="object"):
                client.run("text", None, slow_feed())
        assert client.ping()["ready"] is True


def test_64_mib_input_round_trip(busy_worker: tuple[WorkerProcess, Path]) -> None:
    worker, _ = busy_worker
    x = RNG.standard_normal(16 * 2**20).astype(np.float32)  # 64 MiB
    with shmcache.Client(str(worker.socket_path), timeout=120) as client:
        (y,) = client.run("echo", None, {"x": x})
    assert y.nbytes == 64 * 2**20 and np.array_equal(x, y)


def test_prepacked_segment_carries_blobs(tmp_path: Path) -> None:
    from shmcache.segment import KIND_BLOB, Segment
    from tests.worker.harness import build_segment

    path = models.save(models.mlp((64, 128, 32), seed=3), tmp_path / "m.onnx")
    owned = build_segment(path, f"shmcache.00000000.{os.getpid()}.m.v1.abcdef", "m", tmp_path,
                          True, "all")
    try:
        with Segment.attach(owned.name, verify=True) as seg:
            assert seg.header.prepacked
            blobs = [e for e in seg.entries if e.kind == KIND_BLOB]
            assert blobs and all(seg.entries[b.parent].name in ("w0", "w1") for b in blobs)
    finally:
        owned.unlink()


@pytest.mark.parametrize("prepack", [True, False], ids=["optimized", "plain"])
def test_session_over_an_optimized_graph_skips_the_optimizer(tmp_path: Path, prepack: bool) -> None:
    """The builder optimized the graph at the configured level: a worker loads it with
    optimizations off (same outputs, none of the optimizer's code paged in); a plain segment
    holds the exporter's graph and keeps the configured level."""
    from shmcache.segment import Segment
    from tests.worker.harness import build_segment
    from worker.runtime import create_session

    path = models.save(models.convnet(), tmp_path / "c.onnx")
    owned = build_segment(path, f"shmcache.00000000.{os.getpid()}.c.v1.abcdef", "c", tmp_path,
                          prepack, "all")
    settings = SessionSettings(intra_op_threads=1)
    feed = {"img": RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    try:
        with Segment.attach(owned.name) as seg:
            session = create_session(seg, settings)
            level = session.get_session_options().graph_optimization_level
            got = session.run(None, feed)
            del session
    finally:
        owned.unlink()
    assert level == (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if prepack
                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    want = reference(path, prepacked=prepack).run(None, feed)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]


def test_background_prepare_runs_in_a_thread_of_lower_priority() -> None:
    """A standby's catch-up must yield the CPU to serving: its thread's nice value is raised,
    the caller's is not, and the thread's result or exception comes back to the awaiter."""
    from worker.server import BACKGROUND_NICE, in_niced_thread

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def fail() -> None:
        raise ValueError("boom")

    async def scenario() -> tuple[int, int]:
        niced = await in_niced_thread(own_nice)
        with pytest.raises(ValueError, match="boom"):
            await in_niced_thread(fail)
        return niced, own_nice()

    before = own_nice()
    niced, after = asyncio.run(scenario())
    assert niced == min(19, before + BACKGROUND_NICE) and after == before


class Freed:
    """Stands for a ModelRuntime: records the thread in which it was closed."""

    def __init__(self) -> None:
        self.freed_in: list[str] = []

    def close(self) -> None:
        self.freed_in.append(threading.current_thread().name)


def test_a_dropped_version_is_freed_off_the_loop_once_no_request_holds_it() -> None:
    """release_when_unused waits for every other holder (a request still running on the
    version), then closes it, the last holder: the free happens in its own thread."""
    from worker.server import release_when_unused

    async def scenario() -> tuple[list[str], float, float]:
        runtime = Freed()
        log = runtime.freed_in
        in_flight = runtime  # a request still running on the dropped version
        box = [runtime]
        del runtime
        releaser = threading.Thread(target=release_when_unused, args=(box,), name="releaser")
        releaser.start()
        await asyncio.sleep(0.2)
        still_held = float(len(log))  # 0: the release waits for the request
        released_at = time.monotonic()
        del in_flight
        releaser.join(timeout=5)
        return log, still_held, time.monotonic() - released_at

    log, still_held, waited = asyncio.run(scenario())
    assert still_held == 0
    assert log == ["releaser"]  # freed once, in the releasing thread, not on the loop's
    assert waited < 0.5


def test_replies_say_how_long_the_model_ran(busy_worker: tuple[WorkerProcess, Path]) -> None:
    """``compute`` is the model's own time: positive, within the call, and growing with the
    work (a batch of 256 runs longer than a batch of 1)."""
    worker, _ = busy_worker
    with shmcache.Client(str(worker.socket_path), timeout=60) as client:
        assert client.last_compute_seconds is None
        timed: dict[int, list[float]] = {1: [], 256: []}
        for _ in range(3):
            for batch in timed:
                started = time.perf_counter()
                client.run("slow", None, slow_feed(batch))
                call = time.perf_counter() - started
                compute = client.last_compute_seconds
                assert compute is not None and 0 < compute < call
                timed[batch].append(compute)
        assert min(timed[256]) > max(timed[1])

    async def main() -> float | None:
        async with shmcache.AsyncClient(str(worker.socket_path)) as client:
            await client.run("slow", None, slow_feed(2))
            return client.last_compute_seconds

    assert (asyncio.run(main()) or 0) > 0


def test_acceptor_keeps_few_connections_even_and_lets_a_burst_through_in_batches() -> None:
    """Up to 16 connections each, a worker one ahead of the least-connected other holds back
    (3 clients spread 2 + 1); past that it may be ahead by 1/16 of what the others hold, so
    that a burst of connections is not taken one per ACCEPT_STEP, turn by turn."""
    board = ConnectionBoard.create(f"shmcache-test-board-{uuid.uuid4().hex[:8]}")
    try:
        held: set[object] = set()
        acceptor = Acceptor(types.SimpleNamespace(connections=held), None, board, 0)  # type: ignore[arg-type]

        def delay(mine: int, other: int) -> float:
            held.clear()
            held.update(range(mine))
            board.post(1, other)
            return acceptor.delay()

        assert delay(1, 1) == 0 and delay(2, 1) == ACCEPT_STEP and delay(3, 1) == 2 * ACCEPT_STEP
        assert delay(16, 15) == ACCEPT_STEP  # exact balance below 16 each
        assert delay(17, 16) == 0 and delay(18, 16) == ACCEPT_STEP
        assert delay(170, 160) == 0 and delay(171, 160) == ACCEPT_STEP
    finally:
        board.unlink()
