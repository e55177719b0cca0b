"""The arena's two sides and the protocol's shm tensors, without a daemon (real memfds)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from shmcache import errors, protocol
from shmcache.arena import ClientArena, WorkerArena, check_arena_fd

LIMIT = 1 << 20


def worker_side(client: ClientArena, limit: int = LIMIT) -> WorkerArena:
    """What the worker gets: its own fd for the same memfd (SCM_RIGHTS duplicates it too)."""
    return WorkerArena.adopt(os.dup(client.fd), limit)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_worker_reads_what_the_client_wrote_and_follows_its_growth() -> None:
    with ClientArena(10_000) as client:
        worker = worker_side(client)
        x = np.arange(1000, dtype=np.float32)
        client.write(64, x)
        got = np.frombuffer(worker.view(64, x.nbytes), np.float32)
        assert np.array_equal(got, x)

        mapped = worker.size
        client.ensure(mapped * 3)  # grows the memfd; the worker has not seen it yet
        client.write(mapped * 2, x)
        assert np.array_equal(np.frombuffer(worker.view(mapped * 2, x.nbytes), np.float32), x)
        assert worker.size >= mapped * 3
        assert np.array_equal(got, x)  # an array over the old mapping stays valid
        worker.close()


def test_worker_places_outputs_that_fit_and_the_client_reads_them_back() -> None:
    with ClientArena(8192) as client:
        worker = worker_side(client)
        a, b = np.full(100, 7, np.int64), np.ones(1000, np.float64)
        offsets = worker.place([a, b], (4096, 1024))  # room for a (800 B), not for b
        assert offsets == [4096, None]
        assert np.array_equal(np.frombuffer(client.view(4096, a.nbytes), np.int64), a)
        worker.close()


def test_a_sealed_arena_cannot_shrink_under_the_worker() -> None:
    with ClientArena(8192) as client:
        assert fcntl.fcntl(client.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):  # seals are never removed: no API exists for it
            os.ftruncate(client.fd, 4096)
        client.ensure(16384)  # growing stays allowed
        assert os.fstat(client.fd).st_size == 16384


def unsealed_memfd() -> int:
    fd = os.memfd_create("shmcache-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    return fd


def unsealable_memfd() -> int:
    fd = os.memfd_create("shmcache-test")  # no MFD_ALLOW_SEALING: F_SEAL_SEAL from the start
    os.ftruncate(fd, 8192)
    return fd


def regular_file(tmp_path: Path) -> int:
    path = tmp_path / "file"
    path.write_bytes(b"\0" * 8192)
    return os.open(path, os.O_RDWR)


def pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize("make, why", [
    (lambda tmp: unsealed_memfd(), "F_SEAL_SHRINK"),
    (lambda tmp: unsealable_memfd(), "F_SEAL_SHRINK"),
    (regular_file, "sealable memfd"),
    (lambda tmp: pipe_end(), "not a file"),
])
def test_the_worker_refuses_anything_but_a_shrink_sealed_memfd(make, why: str, tmp_path: Path) -> None:
    fd = make(tmp_path)
    with pytest.raises(errors.Malformed, match=why):
        WorkerArena.adopt(fd, LIMIT)
    assert not is_open(fd)  # adopt owns the fd, refused or not


def test_the_worker_refuses_an_arena_over_its_limit() -> None:
    with ClientArena(LIMIT * 2) as client:
        with pytest.raises(errors.Malformed, match="limit"):
            check_arena_fd(client.fd, LIMIT)


def test_ranges_outside_the_arena_or_the_limit_are_refused() -> None:
    with ClientArena(8192) as client:
        worker = worker_side(client, limit=16384)
        with pytest.raises(errors.Malformed, match="arena has"):
            worker.view(8000, 1000)  # past the memfd's end
        with pytest.raises(errors.Malformed, match="outside"):
            worker.view(16000, 1000)  # past the limit, whatever the memfd's size
        client.ensure(1 << 20)
        with pytest.raises(errors.Malformed, match="outside"):
            worker.view(100_000, 10)  # the client grew it; the worker still maps only its limit
        assert len(worker.view(8000, 1000)) == 1000
        worker.close()


# --- the protocol's shm tensors --------------------------------------------------------------


def shm_request(ref: object, out: object = None, **tensor: object) -> dict:
    spec = {"dtype": "float32", "shape": [4], "shm": ref, **tensor}
    msg = protocol.make_request(5, "infer", model="m", inputs=None, out=out)
    msg["inputs"] = {"x": spec}
    return msg


def test_parse_request_reads_shm_inputs_in_place() -> None:
    with ClientArena(4096) as client:
        worker = worker_side(client)
        x = np.array([1.5, -2, 3, 4], np.float32)
        client.write(128, x)
        req = protocol.parse_request(shm_request([128, 16], out=[1024, 512]), arena=worker)
        assert np.array_equal(req.inputs["x"], x) and req.out == (1024, 512)
        client.write(128, x * 2)  # no copy was taken: the request sees the arena's bytes
        assert np.array_equal(req.inputs["x"], x * 2)
        worker.close()


@pytest.mark.parametrize("msg, exc, match", [
    (shm_request([0, 16]), errors.Malformed, "no arena"),
    (shm_request([0, -16]), errors.Malformed, "non-negative"),
    (shm_request("0:16"), errors.Malformed, r"\[offset, nbytes\]"),
    (shm_request([0, 16, 1]), errors.Malformed, r"\[offset, nbytes\]"),
    (shm_request([0, True]), errors.Malformed, r"\[offset, nbytes\]"),
    (protocol.make_request(5, "infer", model="m", inputs={"x": np.ones(4, np.float32)},
                           out=[0, 16]), errors.Malformed, "no arena"),
])
def test_bad_shm_references_get_typed_errors_with_the_id(
        msg: dict, exc: type[errors.RemoteError], match: str) -> None:
    wire = protocol.decode_body(protocol.encode_frame(msg)[4:])
    with pytest.raises(exc, match=match) as info:
        protocol.parse_request(wire)
    assert info.value.request_id == 5


def test_shm_inputs_are_checked_against_their_shape_and_the_arena() -> None:
    with ClientArena(4096) as client:
        worker = worker_side(client, limit=8192)
        with pytest.raises(errors.BadShape, match="needs 16"):
            protocol.parse_request(shm_request([0, 12]), arena=worker)
        with pytest.raises(errors.Malformed, match="arena"):
            protocol.parse_request(shm_request([4090, 16]), arena=worker)
        worker.close()


def test_ok_infer_puts_what_fits_in_the_region_and_the_rest_inline() -> None:
    with ClientArena(8192) as client:
        worker = worker_side(client)
        big, small = np.arange(512, dtype=np.float32), np.arange(3, dtype=">i4")
        reply = protocol.ok_infer(1, 2, [("big", big), ("small", small)], None, worker, (0, 2048))
        (_, t_big), (_, t_small) = reply["outputs"]
        assert t_big["shm"] == [0, 2048] and "data" not in t_big
        assert "shm" not in t_small and t_small["dtype"] == "int32"
        wire = protocol.decode_body(protocol.encode_frame(reply)[4:])
        got = protocol.outputs_from_reply(wire, client)
        assert np.array_equal(got[0], big) and np.array_equal(got[1], small)
        worker.close()
