"""Small ONNX models built in code for the tests (no model is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def mlp(sizes: tuple[int, ...] = (16, 32, 8), seed: int = 0, gemm: bool = False) -> onnx.ModelProto:
    """MatMul+Add+Relu layers (or Gemm) with a dynamic batch dimension."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(b).astype(np.float32), f"b{i}"))
        if gemm:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"a{i}"]))
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return _model(graph)


def constants(arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One initializer per array, each passed through Identity to an output of the same name."""
    inits, nodes, outputs = [], [], []
    for name, arr in arrays.items():
        inits.append(numpy_helper.from_array(arr, name))
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
        dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
        outputs.append(helper.make_tensor_value_info(f"{name}_out", dtype, list(arr.shape)))
    graph = helper.make_graph(nodes, "constants", [], outputs, inits)
    return _model(graph)


def with_constant_and_subgraph(seed: int = 1) -> onnx.ModelProto:
    """Weights in a Constant node and in an If branch's initializer, as exporters leave them."""
    rng = np.random.default_rng(seed)
    const = rng.standard_normal((4, 4)).astype(np.float32)
    then_w = rng.standard_normal((4, 4)).astype(np.float32)
    else_w = rng.standard_normal((4, 4)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "then_w"], ["then_y"])], "then", [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(then_w, "then_w")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["else_w"], value=numpy_helper.from_array(else_w, "v")),
         helper.make_node("MatMul", ["h", "else_w"], ["else_y"])], "else", [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["batch", 4])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(const, "c")),
        helper.make_node("MatMul", ["x", "c"], ["h"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _model(graph)
