"""worker.prepack: pre-pack with ORT, relocate into a file with a header in front, run from it.

The relocated file lives in tmp_path, not /dev/shm: ORT maps any regular file the same way, and
the tests must not leave segments behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from shmcache.errors import ModelError
from tests import models
from worker.prepack import (
    PAGE,
    ExternalEntry,
    cpu_flags,
    keep_served_inputs,
    main,
    prepack_key,
    read_external_entries,
    relocate_external_data,
    run_prepack,
)

HEADER = 4096
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_mlp(path: Path, d: int = 256, layers: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        b = (rng.standard_normal(d) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
    _save(path, nodes, inits, ["N", d], x, ["N", d])
    return rng.standard_normal((8, d)).astype(np.float32)


def make_conv(path: Path, chans: tuple[int, ...] = (3, 16, 32, 64)) -> np.ndarray:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(len(chans) - 1):
        w = (rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * 0.1).astype(np.float32)
        b = (rng.standard_normal(chans[i + 1]) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Conv", [x, f"W{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
    _save(path, nodes, inits, [1, chans[0], 16, 16], x, [1, chans[-1], 16, 16])
    return rng.standard_normal((1, chans[0], 16, 16)).astype(np.float32)


def _save(path: Path, nodes: list, inits: list, in_shape: list, out: str, out_shape: list) -> None:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def session_options(level: str, **config: str) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


def write_segment(entries: list[ExternalEntry], data: Path, seg: Path) -> dict:
    """A stand-in segment writer: 4 KiB header of other bytes, entries in reverse order."""
    offsets, pos = {}, HEADER
    src = data.read_bytes()
    with seg.open("wb") as f:
        f.write(os.urandom(HEADER))
        for e in reversed(entries):
            pos = -(-pos // e.alignment) * e.alignment
            offsets[e.id] = pos
            f.seek(pos)
            f.write(src[e.offset : e.offset + e.length])
            pos += e.length
    return offsets


def run_relocated(graph_path: Path, data_path: Path, seg: Path, x: np.ndarray) -> np.ndarray:
    """A session over the relocated graph as a worker creates it: optimizations off, since the
    pre-pack's session already ran them."""
    model = onnx.load(str(graph_path), load_external_data=False)
    offsets = write_segment(read_external_entries(model), data_path, seg)
    relocate_external_data(model, seg.name, offsets)
    so = session_options("disabled", **{"session.model_external_initializers_file_folder_path": str(seg.parent)})
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "make, level",
    [(make_mlp, "extended"), (make_conv, "extended"), (make_conv, "all")],
    ids=["mlp-extended", "conv-extended", "conv-all"],
)
def test_relocated_session_is_bit_identical(tmp_path: Path, make, level: str) -> None:
    src = tmp_path / "model.onnx"
    x = make(src)
    out = run_prepack(src, tmp_path / "pp", level)
    seg_dir = tmp_path / "shm"
    seg_dir.mkdir()
    got = run_relocated(out.graph_path, out.data_path, seg_dir / "shmcache-test-m-v1", x)
    ref = ort.InferenceSession(str(src), session_options(level), providers=["CPUExecutionProvider"])
    want = ref.run(None, {"x": x})[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def test_entries_find_every_prepacked_blob(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    make_mlp(src, layers=3)
    out = run_prepack(src, tmp_path / "pp", "extended")
    model = onnx.load(str(out.graph_path), load_external_data=False)
    entries = read_external_entries(model)

    blob_groups = 0
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key.startswith("prepacked"):
                blob_groups += kv.value.count("|")
    blobs = [e for e in entries if e.kind == "prepacked"]
    assert blob_groups >= 3  # one MatMul weight per layer is pre-packed
    assert len(blobs) == blob_groups
    assert {e.tensor for e in blobs} == {"W0", "W1", "W2"}
    assert all(e.key.startswith("FusedGemm+") for e in blobs)
    tensors = [e for e in entries if e.kind == "tensor"]
    assert {e.tensor for e in tensors} == {t.name for t in model.graph.initializer}
    size = out.data_path.stat().st_size
    assert all(e.offset + e.length <= size for e in entries)
    ranges = sorted((e.offset, e.offset + e.length) for e in entries)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "ranges overlap"


def test_relocate_rewrites_every_offset_and_keeps_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    make_mlp(src, layers=2)
    out = run_prepack(src, tmp_path / "pp", "extended")
    model = onnx.load(str(out.graph_path), load_external_data=False)
    entries = read_external_entries(model)
    offsets = {e.id: PAGE * (10 + i * 100) for i, e in enumerate(entries)}
    relocate_external_data(model, "shmcache-x-mlp-v1", offsets)
    moved = read_external_entries(model)
    assert {e.id: e.offset for e in moved} == offsets
    assert {e.location for e in moved} == {"shmcache-x-mlp-v1"}
    assert sorted((e.id, e.length) for e in moved) == sorted((e.id, e.length) for e in entries)


def test_relocate_refuses_missing_or_misaligned_offsets(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    make_mlp(src, layers=1)
    out = run_prepack(src, tmp_path / "pp", "extended")
    model = onnx.load(str(out.graph_path), load_external_data=False)
    entries = read_external_entries(model)
    offsets = {e.id: PAGE * (i + 1) for i, e in enumerate(entries)}
    with pytest.raises(ModelError):
        relocate_external_data(model, "seg", {k: v for k, v in list(offsets.items())[1:]})
    big = next(e for e in entries if e.alignment == PAGE)
    with pytest.raises(ModelError):
        relocate_external_data(model, "seg", {**offsets, big.id: PAGE + 64})


def test_malformed_prepacked_entry_is_a_model_error() -> None:
    t = numpy_helper.from_array(np.zeros(32, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "d"), ("offset", "0"), ("length", "128"), ("prepacked_0", "K|1;2")):
        kv = t.external_data.add()
        kv.key, kv.value = k, v
    model = helper.make_model(helper.make_graph([], "g", [], [], [t]))
    with pytest.raises(ModelError):
        read_external_entries(model)


def test_prepack_key_depends_on_level_and_model() -> None:
    a = prepack_key("d1", "extended")
    assert a == prepack_key("d1", "extended")
    assert a != prepack_key("d1", "all")
    assert a != prepack_key("d1", "basic")
    assert a != prepack_key("d2", "extended")
    assert len(a) == 64 and int(a, 16) >= 0
    with pytest.raises(ValueError):
        prepack_key("d1", "fast")


def test_cpu_flags_are_a_sorted_subset_of_cpuinfo() -> None:
    flags = cpu_flags().split()
    assert flags == sorted(flags)
    cpuinfo = Path("/proc/cpuinfo").read_text().split()
    assert all(f in cpuinfo for f in flags)


def test_cli_runs_prepack_and_reports_failure_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    make_mlp(src, layers=1)
    assert main([str(src), str(tmp_path / "out"), "--opt-level", "extended"]) == 0
    assert (tmp_path / "out" / "model.opt.onnx").exists()
    assert (tmp_path / "out" / "model.opt.data").stat().st_size > 0

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "worker.prepack", str(bad), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.startswith("prepack failed")]
    assert len(last) == 1


@pytest.mark.parametrize("packed", [True, False], ids=["pre-packed", "optimized"])
def test_optimized_graph_asks_only_for_the_models_own_inputs(tmp_path: Path, packed: bool) -> None:
    """IR < 4 lists every initializer as an input; ORT merges two equal ones and its saved
    graph used to keep the dropped name as an input, now required from every caller."""
    src = models.save(models.ir3_shared_constants(), tmp_path / "ir3.onnx")
    out = run_prepack(src, tmp_path / "pp", "extended", packed=packed)
    sess = ort.InferenceSession(str(out.graph_path), session_options("disabled"),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    want = ort.InferenceSession(str(src), session_options("extended"),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sess.run(None, {"x": x})[0].tobytes() == want.tobytes()


def _graph_file(path: Path, inputs: list[str], reads: list[str], output: str = "y") -> Path:
    graph = helper.make_graph(
        [helper.make_node("Sum", reads, [output])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_optimized_graph_that_changed_the_signature_is_refused(tmp_path: Path) -> None:
    """What cannot be put right raises, and the builder serves the plain weights instead."""
    original = _graph_file(tmp_path / "m.onnx", ["x"], ["x"])
    reads_ghost = _graph_file(tmp_path / "a.onnx", ["x", "ghost"], ["x", "ghost"])
    with pytest.raises(ModelError, match="reads 1 input\\(s\\) the model does not have \\(ghost\\)"):
        keep_served_inputs(reads_ghost, original)
    renamed_output = _graph_file(tmp_path / "b.onnx", ["x"], ["x"], output="z")
    with pytest.raises(ModelError, match="outputs \\['z'\\]"):
        keep_served_inputs(renamed_output, original)
    unread = _graph_file(tmp_path / "c.onnx", ["x", "unread"], ["x"])
    keep_served_inputs(unread, original)
    assert [i.name for i in onnx.load(str(unread)).graph.input] == ["x"]
