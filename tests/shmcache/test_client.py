"""Client and AsyncClient against tests/fakeserver.py in its own process, over a real socket,
and, where the fake cannot stand in (arenas, dtype checks, overload), against a real worker."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shmcache import AsyncClient, Client, ModelInfo, errors, protocol
from tests import models
from tests.worker.harness import WorkerProcess, running_worker

ROOT = Path(__file__).resolve().parents[2]
FAKESERVER = ROOT / "tests" / "fakeserver.py"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


class FakeServer:
    """One fakeserver process; start() waits until its socket accepts connections."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(FAKESERVER), self.path, *args], env=env)
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or connectable(self.path), what="fakeserver")
        assert proc.poll() is None, "fakeserver exited at startup"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "w.sock")


@pytest.fixture
def server(sock_path: str) -> Iterator[FakeServer]:
    srv = FakeServer(sock_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    with Client(server.path, timeout=10.0) as c:
        yield c


# A real worker answers overloaded past this many requests in flight.
REAL_MAX_INFLIGHT = 4


@pytest.fixture(scope="module")
def real_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker process (no supervisor) serving echo (arena-sized round trips), int_and_half
    (int32 and float16 inputs) and slow (a few ms a call, to fill the worker)."""
    tmp = tmp_path_factory.mktemp("client-worker")
    paths = {"echo": models.save(models.echo(), tmp / "echo.onnx"),
             "int_and_half": models.save(models.int_and_half(), tmp / "int_and_half.onnx"),
             "slow": models.save(models.slow(), tmp / "slow.onnx")}
    with running_worker(tmp, paths, max_inflight=REAL_MAX_INFLIGHT) as worker:
        yield worker


# --- blocking client ------------------------------------------------------------------------


def test_run_like_onnxruntime(client: Client) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y, z = client.run("add_one", None, {"x": x})
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(z, x * 2)
    (z_only,) = client.run("add_one", ["z"], {"x": x})
    np.testing.assert_array_equal(z_only, x * 2)
    assert client.last_version == 7


def test_run_with_version_and_python_inputs(client: Client) -> None:
    outs, version = client.run_with_version("add_one", ["y"], {"x": [[1.5, 2.5]]})
    assert version == 7
    np.testing.assert_array_equal(outs[0], [[2.5, 3.5]])
    assert outs[0].dtype == np.float32  # x is declared float32; numpy alone makes float64
    (scalar,) = client.run("add_one", ["y"], {"x": np.int64(4)})
    assert scalar.shape == () and scalar == 5


def test_large_tensor_round_trip(client: Client) -> None:
    """Also: the fake server knows no ``attach``; the client's offer of an arena is refused
    with unsupported_op, and every call goes inline instead."""
    x = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)  # 4 MiB each way
    (y,) = client.run("add_one", ["y"], {"x": x})
    np.testing.assert_array_equal(y, x + 1)
    (y,) = client.run("add_one", ["y"], {"x": x[:2]})  # shrinks the buffer again
    np.testing.assert_array_equal(y, x[:2] + 1)


def test_list_feeds_take_the_declared_dtype_and_arrays_are_not_cast(real_worker: WorkerProcess) -> None:
    """As onnxruntime: a list becomes the input's declared type (int32 and float16 here, which
    the worker checks); an ndarray of another dtype stays an error."""
    ints, halves = [[1, 2, 3, 4, 5]], [[0.5, 1.0, 1.5, 2.0, 2.5]]
    typed = {"ints": np.array(ints, np.int32), "halves": np.array(halves, np.float16)}
    with Client(str(real_worker.socket_path), timeout=10.0) as c:
        want = c.run("int_and_half", None, typed)
        got = c.run("int_and_half", None, {"ints": ints, "halves": halves})
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
        with pytest.raises(errors.BadDtype):
            c.run("int_and_half", None, {**typed, "ints": np.array(ints, np.int64)})
        # Types cached before a publish changed them: converted again once, not an error.
        c._input_dtypes["int_and_half"]["ints"] = np.dtype(np.int64)
        again = c.run("int_and_half", None, {"ints": ints, "halves": halves})
        assert again[0].tobytes() == want[0].tobytes()
        assert c._input_dtypes["int_and_half"]["ints"] == np.int32

    async def main() -> list[np.ndarray]:
        async with AsyncClient(str(real_worker.socket_path), timeout=10.0) as ac:
            return await ac.run("int_and_half", None, {"ints": ints, "halves": typed["halves"]})

    for g, w in zip(asyncio.run(main()), want, strict=True):
        assert g.tobytes() == w.tobytes()


class FakeRunOptions:
    """Duck-types onnxruntime.RunOptions (the client must not import onnxruntime)."""

    log_severity_level = 2

    def add_run_config_entry(self, key: str, value: str) -> None:
        pass


def test_run_takes_onnxruntime_arguments_and_refuses_what_it_cannot_honour(client: Client) -> None:
    x = np.zeros((1, 2), np.float32)
    (y,) = client.run("add_one", ["y"], {"x": x}, None)  # run_options, positionally
    np.testing.assert_array_equal(y, x + 1)
    (y,) = client.run("add_one", ["y"], {"x": x}, run_options=None)
    np.testing.assert_array_equal(y, x + 1)
    with pytest.raises(ValueError, match="not supported"):
        client.run("add_one", ["y"], {"x": x}, FakeRunOptions())
    with pytest.raises(TypeError, match="run_options"):
        client.run("add_one", ["y"], {"x": x}, "fast")
    with pytest.raises(TypeError, match="output_names"):
        client.run("add_one", "y", {"x": x})  # type: ignore[arg-type]

    async def main() -> None:
        async with AsyncClient(client.socket_path, timeout=10.0) as ac:
            with pytest.raises(TypeError, match="output_names"):
                await ac.run("add_one", "y", {"x": x})  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="not supported"):
                await ac.run("add_one", None, {"x": x}, FakeRunOptions())
            assert len(await ac.run("add_one", None, {"x": x}, None)) == 2

    asyncio.run(main())


def test_forked_child_uses_its_own_connection(real_worker: WorkerProcess) -> None:
    """The child must not read the parent's answers nor share its arena: both processes get
    exactly their own answers, small (inline) and 400 KB (through the arena) alike."""

    def hammer(c: Client, seed: int) -> int:
        rng = np.random.default_rng(seed)
        wrong = 0
        for i in range(100):
            x = rng.random(100_000 if i % 2 else 16, dtype=np.float32)
            (y,) = c.run("echo", None, {"x": x})
            wrong += y.tobytes() != x.tobytes()
        return wrong

    with Client(str(real_worker.socket_path), timeout=5.0) as c:
        (y,) = c.run("echo", None, {"x": np.ones(100_000, np.float32)})  # connect, attach an arena
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = min(hammer(c, seed=1), 2)
            finally:
                os._exit(code)  # 0: every answer right; 1-2: wrong ones; 3: an exception
        wrong_in_parent = hammer(c, seed=2)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert wrong_in_parent == 0


@pytest.mark.parametrize("size", [16, 1 << 18], ids=["inline", "arena"])
def test_outputs_can_be_changed_in_place_like_onnxruntime_s(real_worker: WorkerProcess,
                                                            size: int) -> None:
    """ORT returns writable arrays (probs /= probs.sum() works); views of a reply's bytes
    were read-only."""
    x = np.arange(size, dtype=np.float32)

    async def through_async() -> np.ndarray:
        async with AsyncClient(str(real_worker.socket_path)) as ac:
            return (await ac.run("echo", None, {"x": x}))[0]

    with Client(str(real_worker.socket_path)) as c:
        outputs = [c.run("echo", None, {"x": x})[0], asyncio.run(through_async())]
    for y in outputs:
        y += 1
        np.testing.assert_array_equal(y, x + 1)


def test_models_and_ping(client: Client) -> None:
    (model,) = client.models()
    assert isinstance(model, ModelInfo)
    assert model.name == "add_one" and model.version == 7
    assert [t.name for t in model.outputs] == ["y", "z"]
    assert model.inputs[0].shape == ["N", None]
    info = client.ping()
    assert info["ready"] is True and isinstance(info["pid"], int)
    assert client.request("ping")["ok"] is True


@pytest.mark.parametrize("code", sorted(errors.ERROR_CLASSES))
def test_every_error_code_raises_its_class(client: Client, code: str) -> None:
    if code == "not_ready":
        pytest.skip("not_ready is retried, tested below")
    with pytest.raises(errors.ERROR_CLASSES[code]) as info:
        client.run(f"error:{code}", None, {"x": np.zeros(1, np.float32)})
    assert info.value.code == code


def test_unknown_code_is_internal_and_connection_survives_errors(client: Client) -> None:
    with pytest.raises(errors.Internal) as info:
        client.run("error:weird", None, {"x": np.zeros(1, np.float32)})
    assert info.value.message == "[weird] odd"
    with pytest.raises(errors.UnknownModel):
        client.run("nope", None, {"x": np.zeros(1, np.float32)})
    with pytest.raises(errors.UnknownOutput):
        client.run("add_one", ["w"], {"x": np.zeros(1, np.float32)})
    with pytest.raises(errors.UnsupportedOp):
        client.request("publish", model="m")
    assert client.ping()["ready"] is True


def test_timeout_raises_timeout_and_next_call_works(server: FakeServer) -> None:
    with Client(server.path, timeout=0.2) as c:
        with pytest.raises(errors.Timeout):
            c.run("sleep", None, {"x": np.float64(5)})
        assert c.ping()["ready"] is True


def test_threads_share_one_client(client: Client) -> None:
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                x = np.full((3,), t * 1000 + i, np.float32)
                (y,) = client.run("add_one", ["y"], {"x": x})
                assert np.array_equal(y, x + 1), (t, i, y)
                assert client.last_version == 7
        except BaseException as exc:  # collected and re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []


def test_close_fails_a_call_in_flight_on_another_thread_at_once(server: FakeServer) -> None:
    """It used to poll the closed fd until the answer (30 s here) came, or hit EBADF."""
    c = Client(server.path, timeout=60.0)
    outcome: list[BaseException | list[np.ndarray]] = []

    def call() -> None:
        try:
            outcome.append(c.run("sleep", None, {"x": np.float64(30)}))
        except BaseException as exc:  # collected and checked in the main thread
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_for(lambda: len(c._conns) == 1, what="the call's connection")
    c.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the call in flight did not notice close()"
    (result,) = outcome
    assert isinstance(result, errors.ConnectionFailed) and "client closed" in str(result)
    assert c.ping()["ready"] is True  # usable again: connects afresh
    c.close()


def test_connections_of_finished_threads_are_closed(client: Client) -> None:
    threads = [threading.Thread(target=client.ping) for _ in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    gc.collect()
    assert len(client._conns) == 0  # their threading.local died, the finalizer closed them
    client.ping()
    assert len(client._conns) == 1


def test_not_ready_is_retried_until_ready(sock_path: str) -> None:
    srv = FakeServer(sock_path)
    srv.start("--not-ready", "4")
    try:
        with Client(sock_path, timeout=10.0) as c:
            assert c.ping()["ready"] is False
            (y,) = c.run("add_one", ["y"], {"x": np.zeros(1, np.float32)})
            assert y[0] == 1
            info = c.ping()
            assert info["ready"] is True and info["not_ready_sent"] == 4
    finally:
        srv.kill()


def test_not_ready_until_timeout_raises_not_ready(sock_path: str) -> None:
    srv = FakeServer(sock_path)
    srv.start("--not-ready", "1000000")
    try:
        with Client(sock_path, timeout=0.3) as c, pytest.raises(errors.NotReady):
            c.run("add_one", None, {"x": np.zeros(1, np.float32)})
    finally:
        srv.kill()


def test_restarted_server_is_reached_by_retry(server: FakeServer, client: Client) -> None:
    first_pid = client.ping()["pid"]
    server.kill()
    server.start()
    info = client.ping()  # the cached connection is dead; the retry uses a fresh one
    assert info["pid"] != first_pid
    (y,) = client.run("add_one", ["y"], {"x": np.ones(2, np.float32)})
    assert list(y) == [2, 2]


def test_dead_server_raises_connection_failed(server: FakeServer, client: Client) -> None:
    assert client.ping()["ready"]
    server.kill()
    with pytest.raises(errors.ConnectionFailed):
        client.run("add_one", None, {"x": np.ones(2, np.float32)})


def test_no_server_raises_connection_failed(sock_path: str) -> None:
    with Client(sock_path, timeout=1.0) as c, pytest.raises(errors.ConnectionFailed):
        c.ping()


def test_default_socket_path_from_environment(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
    monkeypatch.setenv("SHMCACHE_SOCKET", server.path)
    with Client() as c:
        assert c.socket_path == server.path and c.ping()["ready"]


def test_request_larger_than_max_frame_refused_locally(server: FakeServer) -> None:
    with Client(server.path, max_frame=1024) as c, pytest.raises(errors.FrameTooLarge):
        c.run("add_one", None, {"x": np.zeros(1024, np.float32)})


def test_response_larger_than_max_frame(server: FakeServer) -> None:
    with Client(server.path, max_frame=3000) as c:
        with pytest.raises(errors.FrameTooLarge):
            c.run("add_one", None, {"x": np.zeros(500, np.float32)})  # 2 KiB in, 4 KiB out
        assert c.ping()["ready"]


def recv_frames_until_eof(sock: socket.socket) -> list[dict]:
    decoder = protocol.FrameDecoder()
    frames: list[dict] = []
    sock.settimeout(10.0)
    while chunk := sock.recv(65536):
        frames += decoder.feed(chunk)
    return frames


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (protocol.HEADER.pack(protocol.DEFAULT_MAX_FRAME + 1), "frame_too_large"),  # header only
        (protocol.HEADER.pack(3) + b"\xc1\xc1\xc1", "malformed"),
        (protocol.encode_frame({"v": 1, "op": "ping"}), "malformed"),  # no id
    ],
)
def test_malformed_frame_gets_id_nil_error_then_close(server: FakeServer, raw: bytes, code: str) -> None:
    """The server-side pattern the worker follows: decide on the header, answer, hang up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        s.sendall(raw)
        (reply,) = recv_frames_until_eof(s)
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["code"] == code


def test_bad_contents_keep_the_connection(server: FakeServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        s.sendall(protocol.encode_frame({"v": 2, "id": 11, "op": "ping"}))
        s.sendall(protocol.encode_frame(protocol.make_request(12, "ping")))
        decoder = protocol.FrameDecoder()
        replies: dict[int, dict] = {}
        while len(replies) < 2:
            for reply in decoder.feed(s.recv(65536)):
                replies[reply["id"]] = reply
    assert replies[11]["error"]["code"] == "malformed" and "version" in replies[11]["error"]["message"]
    assert replies[12]["ok"] is True


# --- asyncio client -------------------------------------------------------------------------


def test_async_pipelined_out_of_order(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.path, timeout=10.0) as c:
            await c.connect()
            xs = [np.full((2,), i, np.int64) for i in range(100)]
            results = await asyncio.gather(*(c.run_with_version("add_one", ["y"], {"x": x}) for x in xs))
            for x, (outs, version) in zip(xs, results, strict=True):
                np.testing.assert_array_equal(outs[0], x + 1)
                assert version == 7
            assert c._proto is not None and len(c._proto.pending) == 0
            (m,) = await c.models()
            assert m.name == "add_one"
            assert (await c.ping())["ready"] is True

    asyncio.run(main())


def test_async_errors_timeout_and_late_answer_dropped(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.path, timeout=0.3) as c:
            with pytest.raises(errors.BadShape):
                await c.run("error:bad_shape", None, {"x": np.zeros(1, np.float32)})
            with pytest.raises(errors.Timeout):
                await c.run("sleep", None, {"x": np.float64(0.5)})
            # The late answer to the sleep arrives on the same connection and is ignored.
            outs = await c.run("add_one", ["y"], {"x": np.zeros(1, np.float32)})
            assert outs[0][0] == 1
            assert c.last_version == 7

    asyncio.run(main())


def test_async_restart_retries_and_dead_raises(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.path, timeout=5.0) as c:
            pid = (await c.ping())["pid"]
            server.kill()
            server.start()
            answers = await asyncio.gather(*(c.run("add_one", ["y"], {"x": [i]}) for i in range(20)))
            assert [int(a[0][0]) for a in answers] == list(range(1, 21))
            assert (await c.ping())["pid"] != pid
            server.kill()
            with pytest.raises(errors.ConnectionFailed):
                await c.ping()

    asyncio.run(main())


def test_async_in_flight_requests_fail_over_when_server_dies(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.path, timeout=5.0) as c:
            await c.connect()
            pending = [asyncio.create_task(c.run("sleep", None, {"x": np.float64(2)})) for _ in range(5)]
            while c._proto is None or len(c._proto.pending) < 5:  # all five sent
                await asyncio.sleep(0.001)
            await asyncio.get_running_loop().run_in_executor(None, server.kill)
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(isinstance(r, errors.ConnectionFailed) for r in results), results

    asyncio.run(main())


def test_async_close_fails_in_flight_without_resending(server: FakeServer) -> None:
    async def main() -> None:
        c = AsyncClient(server.path, timeout=5.0)
        task = asyncio.create_task(c.run("sleep", None, {"x": np.float64(3)}))
        while c._proto is None or not c._proto.pending:
            await asyncio.sleep(0.001)
        await c.close()
        with pytest.raises(errors.ConnectionFailed, match="closed"):
            await task
        assert (await c.ping())["ready"] is True  # usable again: connects afresh
        await c.close()

    asyncio.run(main())


def test_async_bounds_its_requests_in_flight(server: FakeServer) -> None:
    async def main() -> int:
        most = 0
        async with AsyncClient(server.path, timeout=10.0, max_in_flight=5) as c:
            await c.connect()
            calls = asyncio.gather(*(c.run("add_one", ["y"], {"x": np.full(2, i, np.int64)})
                                     for i in range(60)))
            while not calls.done():
                assert c._proto is not None
                most = max(most, len(c._proto.pending))
                await asyncio.sleep(0)
            for i, (y,) in enumerate(await calls):
                np.testing.assert_array_equal(y, [i + 1, i + 1])
        return most

    most = asyncio.run(main())
    assert 1 < most <= 5


def test_async_retries_overloaded_until_served(real_worker: WorkerProcess) -> None:
    """Six connections with three calls each, on a worker that holds four for all of them:
    the excess is answered overloaded and must be retried, not raised (200 calls on one
    AsyncClient got 115 Overloaded)."""
    feed = {"x": np.random.default_rng(3).standard_normal((64, 768)).astype(np.float32)}

    async def main() -> list[object]:
        clients = [AsyncClient(str(real_worker.socket_path), timeout=60.0) for _ in range(6)]
        try:
            for c in clients:
                await c.ping()  # accepted (the worker paces accepts); then every call at once
            calls = [c.run("slow", None, feed) for c in clients for _ in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for c in clients:
                await c.close()

    results = asyncio.run(main())
    assert all(isinstance(r, list) for r in results), [type(r).__name__ for r in results]
    first = results[0]
    assert isinstance(first, list)
    assert all(isinstance(r, list) and r[0].tobytes() == first[0].tobytes() for r in results)


def test_async_overloaded_until_timeout_raises_overloaded(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.path, timeout=0.3) as c:
            with pytest.raises(errors.Overloaded):
                await c.run("error:overloaded", None, {"x": np.zeros(1, np.float32)})

    asyncio.run(main())


def test_async_not_ready_retried(sock_path: str) -> None:
    srv = FakeServer(sock_path)
    srv.start("--not-ready", "3")

    async def main() -> None:
        async with AsyncClient(sock_path, timeout=10.0) as c:
            (y,) = await c.run("add_one", ["y"], {"x": np.zeros(1, np.float32)})
            assert y[0] == 1
            assert (await c.ping())["not_ready_sent"] == 3

    try:
        asyncio.run(main())
    finally:
        srv.kill()


@pytest.mark.parametrize("outputs, feed, error, message", [
    (["y"] * 1025, {"x": np.ones(1)}, errors.Malformed, "1025 output names; a request carries at most 1024"),
    (None, {f"x{i}": np.ones(1) for i in range(1025)}, errors.Malformed, "1025 input names"),
    (None, {"x" * 70000: np.ones(1)}, errors.Malformed, "input name 'xxx.* is over 65536 bytes"),
    (None, {1: np.ones(1)}, TypeError, "input names must be str, got int 1"),
    ([b"y"], {"x": np.ones(1)}, TypeError, "output names must be str, got bytes"),
])
def test_a_request_over_the_limits_is_refused_before_sending_naming_the_argument(
    tmp_path: Path, outputs: list[object] | None, feed: dict[object, np.ndarray],
    error: type[Exception], message: str,
) -> None:
    """The worker could only refuse the whole frame ("not a readable msgpack map") and hang
    up; the client says which argument is wrong, without connecting (no daemon here)."""
    with Client(str(tmp_path / "none.sock")) as client, \
            pytest.raises(error, match=message):
        client.run("m", outputs, feed)  # type: ignore[arg-type]
