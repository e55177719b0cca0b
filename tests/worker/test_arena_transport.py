"""Tensors through a memfd arena: a real worker process, real sockets, real SCM_RIGHTS.

What must hold: large calls go through the arena and answer bit for bit what an inline call
and an in-process session answer; small calls never attach one; and whatever a client hands
the worker in place of a sealed memfd gets a typed error on that request, costs the worker
no fd, and leaves the connection (or at least the worker) serving.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import shmcache
from shmcache import protocol
from shmcache.arena import MIN_BYTES, ClientArena
from tests import models
from tests.worker.harness import WorkerProcess, running_worker
from tests.worker.test_worker import reference

RNG = np.random.default_rng(23)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("arena")
    paths = {"mlp": models.save(models.mlp((512, 256, 128), seed=31), tmp / "mlp.onnx"),
             "widen": models.save(models.mlp((16, 2048), seed=32), tmp / "widen.onnx"),
             "echo": models.save(models.echo(), tmp / "echo.onnx")}
    with running_worker(tmp, paths) as w:
        yield w, paths


def arena_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:shmcache-arena" in line for line in f)


def settled_arena_maps(pid: int) -> int:
    """The worker's arena mappings once an earlier test's connections are gone (it unmaps
    their arenas on its own loop, a moment after the client closed)."""
    counts = [arena_maps(pid)]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(counts) < 3 or len(set(counts[-3:])) > 1):
        time.sleep(0.05)
        counts.append(arena_maps(pid))
    return counts[-1]


def open_fds(pid: int) -> int:
    """The worker's open fds once it has closed the connections of earlier calls (it closes
    them on its own loop, a moment after the client did)."""
    counts = [len(os.listdir(f"/proc/{pid}/fd"))]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(counts) < 3 or len(set(counts[-3:])) > 1):
        time.sleep(0.05)
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
    return counts[-1]


def test_large_calls_go_through_the_arena_and_answer_bit_for_bit(
        worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    w, paths = worker
    ref = reference(paths["mlp"])
    feed = {"x": RNG.standard_normal((512, 512)).astype(np.float32)}  # 1 MiB in, 256 KiB out
    before = settled_arena_maps(w.proc.pid)
    with shmcache.Client(str(w.socket_path)) as shm, \
            shmcache.Client(str(w.socket_path), shared_memory=False) as inline:
        got = shm.run("mlp", None, feed)[0]
        assert arena_maps(w.proc.pid) == before + 1
        assert got.tobytes() == ref.run(None, feed)[0].tobytes()
        assert got.tobytes() == inline.run("mlp", None, feed)[0].tobytes()
        assert arena_maps(w.proc.pid) == before + 1  # the inline client attached nothing
        again = shm.run("mlp", None, feed)[0]
        assert again.tobytes() == got.tobytes()  # the first answer was a copy, not a view
        assert got.flags.writeable  # a copy the caller owns, like the arrays ORT returns


def test_small_calls_stay_inline(worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    w, paths = worker
    ref = reference(paths["mlp"])
    before = settled_arena_maps(w.proc.pid)
    feed = {"x": RNG.standard_normal((4, 512)).astype(np.float32)}
    assert feed["x"].nbytes * 2 < MIN_BYTES
    with shmcache.Client(str(w.socket_path)) as client:
        for _ in range(3):
            assert client.run("mlp", None, feed)[0].tobytes() == ref.run(None, feed)[0].tobytes()
        assert arena_maps(w.proc.pid) == before


def test_growing_calls_and_outputs_bigger_than_guessed(
        worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    w, paths = worker
    ref = reference(paths["widen"])
    with shmcache.Client(str(w.socket_path), timeout=60) as client:
        for n in (300_000, 2_000_000, 9_000_000, 300_000):  # the arena grows; the worker remaps
            x = RNG.standard_normal(n).astype(np.float32)
            assert np.array_equal(client.run("echo", None, {"x": x})[0], x)
        # 128 KiB in, 16 MiB out: the first answer overflows the guessed region (inline), the
        # next ones fit; every one is right.
        for _ in range(3):
            feed = {"x": RNG.standard_normal((2048, 16)).astype(np.float32)}
            assert client.run("widen", None, feed)[0].tobytes() == ref.run(None, feed)[0].tobytes()


# --- a hostile client, by hand --------------------------------------------------------------


def read_frame(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("worker closed the connection")
            buf += chunk
        return buf

    (size,) = struct.unpack(">I", exactly(4))
    return protocol.decode_body(exactly(size))


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([b"\0"], anc)


def attach(sock: socket.socket, fds: list[int], rid: int = 1) -> dict:
    sock.sendall(protocol.encode_frame(protocol.make_request(rid, protocol.ATTACH)))
    first = read_frame(sock)
    assert first == {"v": 1, "id": rid, "ok": True, "send_fd": True}
    send_fds(sock, fds)
    return read_frame(sock)


def ping_ok(sock: socket.socket, rid: int = 99) -> bool:
    sock.sendall(protocol.encode_frame(protocol.make_request(rid, "ping")))
    return read_frame(sock).get("ok") is True


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def unsealed_memfd() -> int:
    fd = os.memfd_create("shmcache-arena", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    return fd


def test_refused_hand_offs_get_typed_errors_and_keep_the_connection(
        worker: tuple[WorkerProcess, dict[str, Path]], tmp_path: Path) -> None:
    w, _ = worker
    fds_before = open_fds(w.proc.pid)
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 4096)
    good = ClientArena(1 << 20)
    with connect(w.socket_path) as sock:
        for fds, why in [([], "exactly one fd, got 0"),
                         ([unsealed_memfd()], "F_SEAL_SHRINK"),
                         ([os.open(plain, os.O_RDWR)], "sealable memfd"),
                         ([good.fd, good.fd], "exactly one fd, got 2")]:
            reply = attach(sock, fds)
            assert reply["ok"] is False and reply["error"]["code"] == "malformed", reply
            assert why in reply["error"]["message"]
            assert ping_ok(sock)
        # After all that, a proper arena is still accepted on the same connection, and used.
        reply = attach(sock, [good.fd], rid=2)
        assert reply["ok"] is True and reply["size"] == 1 << 20 and reply["limit"] > 0
        x = np.arange(16, dtype=np.float32)
        good.write(4096, x)
        msg = protocol.make_request(3, "infer", model="echo", inputs=None, out=[8192, 64])
        msg["inputs"] = {"x": protocol.tensor_ref("float32", [16], 4096, 64)}
        sock.sendall(protocol.encode_frame(msg))
        reply = read_frame(sock)
        assert reply["ok"] is True and reply["outputs"][0][1]["shm"] == [8192, 64]
        assert np.array_equal(np.frombuffer(good.view(8192, 64), np.float32), x)
        # A reference outside the arena is one bad request, not a dead worker.
        msg["id"], msg["inputs"]["x"]["shm"] = 4, [(1 << 20) - 32, 64]
        sock.sendall(protocol.encode_frame(msg))
        reply = read_frame(sock)
        assert reply["id"] == 4 and reply["error"]["code"] == "malformed"
        assert ping_ok(sock)
    good.close()
    assert open_fds(w.proc.pid) == fds_before  # every fd it was handed is closed again


def test_shm_tensors_without_an_arena_are_refused(worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    w, _ = worker
    with connect(w.socket_path) as sock:
        msg = protocol.make_request(7, "infer", model="echo", inputs=None)
        msg["inputs"] = {"x": protocol.tensor_ref("float32", [16], 0, 64)}
        sock.sendall(protocol.encode_frame(msg))
        reply = read_frame(sock)
        assert reply["id"] == 7 and reply["error"]["code"] == "malformed"
        assert "no arena" in reply["error"]["message"]
        assert ping_ok(sock)


def test_too_many_fds_or_a_hang_up_mid_hand_off_cost_only_that_connection(
        worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    w, _ = worker
    fds_before = open_fds(w.proc.pid)
    many = [unsealed_memfd() for _ in range(6)]
    with connect(w.socket_path) as sock:
        reply = attach(sock, many)
        assert reply["ok"] is False and "more than" in reply["error"]["message"]
        with pytest.raises((EOFError, ConnectionError)):
            read_frame(sock)  # the worker closed it: the stream's position is unknown
    for fd in many:
        os.close(fd)
    with connect(w.socket_path) as sock:
        sock.sendall(protocol.encode_frame(protocol.make_request(1, protocol.ATTACH)))
        assert read_frame(sock)["send_fd"] is True
    # hung up before sending the fd
    with connect(w.socket_path) as sock:
        assert ping_ok(sock)
    assert open_fds(w.proc.pid) == fds_before


def test_an_output_region_outside_the_arena_is_one_bad_request(
        worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    """Checked when the request is read, like its inputs: the answer, on the loop thread or
    from the pool, must be an error on that request, never a reply that cannot be built."""
    w, _ = worker
    with ClientArena(1 << 20) as arena:
        with connect(w.socket_path) as sock:
            assert attach(sock, [arena.fd])["ok"] is True
            x = RNG.standard_normal((2048, 16)).astype(np.float32)  # a run of a few ms: pooled
            arena.write(0, x)
            for rid in range(5, 9):
                msg = protocol.make_request(rid, "infer", model="widen", inputs=None,
                                            out=[1 << 22, 1 << 25])  # past the 1 MiB arena
                msg["inputs"] = {"x": protocol.tensor_ref("float32", [2048, 16], 0, x.nbytes)}
                sock.sendall(protocol.encode_frame(msg))
                reply = read_frame(sock)
                assert reply["id"] == rid and reply["error"]["code"] == "malformed", reply
            assert ping_ok(sock)


F_SEAL_FUTURE_WRITE = 0x10  # Linux 5.1; not in Python's fcntl module


def test_an_arena_the_worker_cannot_map_again_is_one_bad_request(
        worker: tuple[WorkerProcess, dict[str, Path]]) -> None:
    """The client seals its memfd against new writable mappings, then grows it: the worker's
    remap fails with an OSError, which is that request's malformed, not a silent hang-up."""
    w, _ = worker
    fd = os.memfd_create("shmcache-arena", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 16)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with connect(w.socket_path) as sock:
            assert attach(sock, [fd])["ok"] is True
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
            os.ftruncate(fd, 1 << 20)
            msg = protocol.make_request(5, "infer", model="echo", inputs=None)
            msg["inputs"] = {"x": protocol.tensor_ref("float32", [16], 1 << 19, 64)}
            sock.sendall(protocol.encode_frame(msg))
            reply = read_frame(sock)
            assert reply["id"] == 5 and reply["error"]["code"] == "malformed", reply
            assert ping_ok(sock)
    finally:
        os.close(fd)
