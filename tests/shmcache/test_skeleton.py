"""graph_skeleton: an ONNX file's graph, names, dtypes and dims, without the weights' bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shmcache.candidate import signature_of
from shmcache.errors import ModelError
from shmcache.skeleton import graph_skeleton
from tests import models

MODELS = {
    "mlp": lambda: models.mlp((64, 128, 32), seed=3),
    "constant and subgraph": models.with_constant_and_subgraph,
    "convnet": models.convnet,
    "multi io": models.multi_io,
    "int and half": models.int_and_half,
}


def parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model


def headers(model: onnx.ModelProto) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer]


@pytest.mark.parametrize("name", list(MODELS))
def test_skeleton_keeps_the_signature_and_every_initializer_header(
        name: str, tmp_path: Path) -> None:
    full = MODELS[name]()
    path = models.save(full, tmp_path / "m.onnx")
    skeleton = parse(graph_skeleton(path))
    assert signature_of(skeleton) == signature_of(full)
    assert headers(skeleton) == headers(full)
    assert [n.op_type for n in skeleton.graph.node] == [n.op_type for n in full.graph.node]
    assert skeleton.opset_import == full.opset_import
    for t in skeleton.graph.initializer:
        assert not t.raw_data and not t.float_data and not t.int64_data and not t.int32_data


def test_skeleton_leaves_the_weight_bytes_out(tmp_path: Path) -> None:
    path = models.save(models.mlp((256, 512, 256), seed=1), tmp_path / "m.onnx")
    assert path.stat().st_size > 1_000_000
    assert len(graph_skeleton(path)) < 2_000


def test_initializers_listed_as_inputs_stay_out_of_the_signature(tmp_path: Path) -> None:
    """IR < 4 lists initializers among the graph's inputs: the skeleton keeps their names so
    signature_of can leave them out, as it does for the full model."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    full = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=3)
    path = tmp_path / "m.onnx"
    path.write_bytes(full.SerializeToString())
    skeleton = parse(graph_skeleton(path))
    assert [i.name for i in signature_of(skeleton).inputs] == ["x"]
    assert signature_of(skeleton) == signature_of(full)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    data = models.mlp((64, 128, 32), seed=3).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated"):
        graph_skeleton(path)


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"not an onnx file at all\n" * 10])
def test_garbage_is_refused(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError):
        graph_skeleton(path)


def test_a_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        graph_skeleton(tmp_path / "absent.onnx")
