"""The segment: round trips, zero-copy views, corruption, bad models, permissions, no leftovers."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import mmap
import numpy as np
import onnx
import onnxruntime as ort
import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from shmcache import segment as seg_mod
from shmcache.errors import (
    ModelError,
    NoSpace,
    SegmentError,
    SegmentCorrupt,
    SegmentExists,
    SegmentNotFound,
)
from shmcache.model import build_model_segment, load_model
from shmcache.segment import HEADER_SIZE, Segment
from tests import models

SHM = Path("/dev/shm")

ALL_DTYPES = {
    "f16": np.arange(12, dtype=np.float16).reshape(3, 4) / 3,
    "f32": np.linspace(-1, 1, 10, dtype=np.float32),
    "f64": np.array([[np.pi, -np.e]], dtype=np.float64),
    "bf16": np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16),
    "i8": np.array([-128, 0, 127], dtype=np.int8),
    "i16": np.array([-32768, 7, 32767], dtype=np.int16),
    "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    "i64": np.array([-(2**63), 2**63 - 1, 5], dtype=np.int64),
    "u8": np.arange(256, dtype=np.uint8),
    "u16": np.array([0, 65535], dtype=np.uint16),
    "u32": np.array([0, 2**32 - 1], dtype=np.uint32),
    "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "scalar": np.array(42.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "big": np.arange(70_000, dtype=np.float32),  # crosses the page-alignment threshold
}


def build(model: onnx.ModelProto, name: str, tmp_path: Path, **kw: object) -> seg_mod.OwnedSegment:
    path = models.save(model, tmp_path / "m.onnx")
    return build_model_segment(load_model(path), name=name, model_name="t", version=7, **kw)


def data_pointer_inside(view: np.ndarray, segment: Segment) -> bool:
    lo, hi = _mapping_range(segment)
    ptr = view.__array_interface__["data"][0]
    return lo <= ptr and ptr + view.nbytes <= hi


def _mapping_range(segment: Segment) -> tuple[int, int]:
    """Address range of the segment's read-only mapping, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("/dev/shm/" + segment.name) and " r--s " in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi - lo >= segment.size:
                return lo, hi
    raise AssertionError("segment mapping not found in /proc/self/maps")


def test_round_trip_every_dtype_zero_copy(shm_name: str, tmp_path: Path) -> None:
    owned = build(models.constants(ALL_DTYPES), shm_name, tmp_path)
    with Segment.attach(shm_name, verify=True) as seg:
        assert seg.header.model == "t" and seg.header.version == 7 and seg.header.sealed
        for name, expected in ALL_DTYPES.items():
            view = seg.tensor(name)
            assert view.dtype == expected.dtype.newbyteorder("<") or view.dtype == expected.dtype
            assert view.shape == expected.shape
            assert view.tobytes() == np.ascontiguousarray(expected).tobytes()
            assert not view.flags.writeable
            if view.nbytes:
                assert data_pointer_inside(view, seg)
        for entry in seg.entries:
            assert entry.offset % seg_mod.ALIGN == 0
            if entry.length >= seg_mod.PAGE_ALIGN_MIN:
                assert entry.offset % seg_mod.PAGE == 0
        del view
    owned.unlink()
    assert not (SHM / shm_name).exists()


def test_segment_graph_runs_in_onnxruntime_identically(shm_name: str, tmp_path: Path) -> None:
    model = models.mlp((8, 64, 4), seed=3)
    path = models.save(model, tmp_path / "mlp.onnx")
    owned = build_model_segment(load_model(path), name=shm_name, model_name="mlp", version=1)
    try:
        with Segment.attach(shm_name) as seg:
            so = ort.SessionOptions()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", "/dev/shm")
            shared = ort.InferenceSession(seg.graph_bytes(), so, providers=["CPUExecutionProvider"])
            direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
            assert np.array_equal(shared.run(None, {"x": x})[0], direct.run(None, {"x": x})[0])
            graph = onnx.load_from_string(seg.graph_bytes())
            for t in graph.graph.initializer:  # big ones point into the segment, tiny stay inline
                big = t.data_location == TensorProto.EXTERNAL
                assert big == (seg.tensor(t.name).nbytes >= 4096), t.name
            del shared
    finally:
        owned.unlink()


def test_constants_and_subgraph_weights_become_entries(shm_name: str, tmp_path: Path) -> None:
    model = models.with_constant_and_subgraph()
    path = models.save(model, tmp_path / "branchy.onnx")
    owned = build_model_segment(load_model(path), name=shm_name, model_name="b", version=1)
    try:
        with Segment.attach(shm_name) as seg:
            names = {e.name for e in seg.tensor_entries()}
            assert {"c", "then_w", "else_w"} <= names
            graph = onnx.load_from_string(seg.graph_bytes())
            assert not any(n.op_type == "Constant" for n in graph.graph.node)
            branches = {a.name: a.g for a in graph.graph.node[-1].attribute}
            for g in (graph.graph, *branches.values()):
                assert not any(n.op_type == "Constant" for n in g.node)
                assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data
                           for t in g.initializer)
            assert len(seg.graph_bytes()) < 3000  # no weight bytes left inline
            so = ort.SessionOptions()
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", "/dev/shm")
            shared = ort.InferenceSession(seg.graph_bytes(), so, providers=["CPUExecutionProvider"])
            direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
            for flag in (True, False):
                feed = {"x": x, "flag": np.array(flag)}
                assert np.array_equal(shared.run(None, feed)[0], direct.run(None, feed)[0])
            del shared
    finally:
        owned.unlink()


def test_mode_is_0600_by_default_and_0640_with_group(shm_name: str, tmp_path: Path) -> None:
    owned = build(models.mlp(), shm_name, tmp_path)
    assert stat.S_IMODE((SHM / shm_name).stat().st_mode) == 0o600
    owned.unlink()
    owned = build(models.mlp(), shm_name, tmp_path, mode=0o640, gid=os.getgid())
    info = (SHM / shm_name).stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == os.getgid()
    owned.unlink()


def test_name_taken_is_refused_and_first_segment_intact(shm_name: str, tmp_path: Path) -> None:
    owned = build(models.mlp(seed=1), shm_name, tmp_path)
    try:
        with pytest.raises(SegmentExists, match="already taken"):
            build(models.mlp(seed=2), shm_name, tmp_path)
        with Segment.attach(shm_name, verify=True) as seg:
            assert np.array_equal(
                seg.tensor("w0"), numpy_helper.to_array(models.mlp(seed=1).graph.initializer[0])
            )
    finally:
        owned.unlink()


def test_no_room_in_dev_shm_is_refused_before_writing(
    shm_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seg_mod, "free_shm_bytes", lambda: 1000)
    with pytest.raises(NoSpace, match=r"needs .* MiB .* only 0\.0 MiB is free"):
        build(models.mlp(), shm_name, tmp_path)
    assert not (SHM / shm_name).exists()


def test_allocation_failure_leaves_nothing(
    shm_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(seg_mod.os, "posix_fallocate", no_space)
    with pytest.raises(NoSpace, match="could not allocate"):
        build(models.mlp(), shm_name, tmp_path)
    assert not (SHM / shm_name).exists()


@pytest.mark.parametrize(
    "content, match",
    [(None, "does not exist"), (b"\x00\x01garbage" * 50, "not an ONNX model"),
     (b"hello, I am a text file\n", "not an ONNX model"), (b"", "not an ONNX model")],
)
def test_bad_model_files(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_unsupported_dtype_is_refused_and_nothing_left(shm_name: str, tmp_path: Path) -> None:
    """Over a page of strings (a few labels would stay in the graph: test_worker)."""
    t = helper.make_tensor("s", TensorProto.STRING, [2000], [b"label"] * 2000)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["o"])], "g", [],
        [helper.make_tensor_value_info("o", TensorProto.STRING, [2000])], [t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="STRING cannot be held"):
        build(model, shm_name, tmp_path)
    assert not (SHM / shm_name).exists()


def test_missing_segment_is_typed(shm_name: str) -> None:
    with pytest.raises(SegmentNotFound):
        Segment.attach(shm_name)


def _write_raw(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=max(len(data), 1))
    try:
        os.ftruncate(shm.fd, len(data))
        if data:
            with mmap.mmap(shm.fd, len(data)) as mem:
                mem[:] = data
    finally:
        shm.close_fd()


@pytest.fixture(scope="module")
def pristine() -> bytes:
    """The bytes of a small valid segment, to corrupt."""
    import secrets
    import tempfile

    name = f"shmcache.00000000.{os.getpid()}.pristine.v1.{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory() as tmp:
        owned = build(models.with_constant_and_subgraph(), name, Path(tmp))
    try:
        return (SHM / name).read_bytes()
    finally:
        owned.unlink()


def _attach_corrupt(name: str, data: bytes) -> None:
    _write_raw(name, data)
    try:
        Segment.attach(name, verify=True).close()
    finally:
        posix_ipc.unlink_shared_memory("/" + name)


# Creation time and creator pid: not covered by the digest (adoption rewrites the pid).
_UNCHECKED_HEADER = set(range(120, 132))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_header_or_table_bytes_raise_typed_error(
    pristine: bytes, shm_name: str, data: st.DataObject
) -> None:
    table_end = HEADER_SIZE + int.from_bytes(pristine[152:160], "little")
    at = data.draw(st.integers(0, table_end - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    corrupted = bytearray(pristine)
    corrupted[at] ^= flip
    if at in _UNCHECKED_HEADER:
        _attach_corrupt(shm_name, bytes(corrupted))  # allowed to attach: metadata only
        return
    with pytest.raises(SegmentCorrupt):
        _attach_corrupt(shm_name, bytes(corrupted))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_segments_raise_typed_error(
    pristine: bytes, shm_name: str, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(pristine) - 1), label="length")
    with pytest.raises(SegmentCorrupt):
        _attach_corrupt(shm_name, pristine[:cut])


def test_flipped_data_byte_is_caught_by_verify(pristine: bytes, shm_name: str) -> None:
    corrupted = bytearray(pristine)
    corrupted[-200] ^= 0xFF
    _write_raw(shm_name, bytes(corrupted))
    try:
        Segment.attach(shm_name).close()  # structurally fine
        with pytest.raises(SegmentCorrupt, match="digest mismatch"):
            Segment.attach(shm_name, verify=True)
    finally:
        posix_ipc.unlink_shared_memory("/" + shm_name)


def test_unsealed_and_foreign_segments_are_refused(pristine: bytes, shm_name: str) -> None:
    building = bytearray(pristine)
    building[10:12] = b"\0\0"
    with pytest.raises(SegmentCorrupt, match="not sealed"):
        _attach_corrupt(shm_name, bytes(building))
    with pytest.raises(SegmentCorrupt, match="bad magic"):
        _attach_corrupt(shm_name, b"\x7fELF" + bytes(4000))


READER = """
import hashlib, sys
from shmcache.segment import Segment
seg = Segment.attach(sys.argv[1])
for name, view in seg.tensors():
    print(name, hashlib.sha256(view.tobytes()).hexdigest())
"""


def test_two_processes_attach_at_once_and_read_identical_bytes(shm_name: str, tmp_path: Path) -> None:
    model = models.mlp((32, 256, 64), seed=5)
    expected = {t.name: hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()
                for t in model.graph.initializer}
    owned = build(model, shm_name, tmp_path)
    try:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        procs = [subprocess.Popen([sys.executable, "-c", READER, shm_name], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        for out in outputs:
            assert dict(line.split() for line in out.splitlines()) == expected
    finally:
        owned.unlink()


def test_a_name_too_long_for_the_table_is_refused_by_name() -> None:
    """The table holds a name's length in 16 bits: longer names are refused with the limit,
    not with struct's "ushort format requires 0 <= number <= 65535"."""
    def source(name: str) -> seg_mod.EntrySource:
        return seg_mod.EntrySource(name, TensorProto.FLOAT, (1,), 4, lambda dest: None)

    seg_mod.plan_layout([source("w" * seg_mod.MAX_TENSOR_NAME)])
    with pytest.raises(SegmentError, match="at most 65535"):
        seg_mod.plan_layout([source("w" * (seg_mod.MAX_TENSOR_NAME + 1))])
