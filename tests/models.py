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
    const = rng.standard_normal((32, 32)).astype(np.float32)
    then_w = rng.standard_normal((32, 32)).astype(np.float32)
    else_w = rng.standard_normal((32, 32)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "then_w"], ["then_y"])], "then", [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(then_w, "then_w")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["else_w"], value=numpy_helper.from_array(else_w, "v")),
         helper.make_node("MatMul", ["h", "else_w"], ["else_y"])], "else", [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["batch", 32])],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(const, "c")),
        helper.make_node("MatMul", ["x", "c"], ["h"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
    )
    return _model(graph)


def convnet(seed: int = 2) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm, NCHW float32."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "k1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "kb1"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "k2"),
        numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "k1", "kb1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return _model(graph)


def conv_only(seed: int = 4) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, no MatMul or Gemm: ORT 1.32's fp32 kernels pre-pack none of it."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "k1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "k2"),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "k1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv_only",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 16, 16])], inits)
    return _model(graph)


def unranked(seed: int = 5) -> onnx.ModelProto:
    """x declared without a shape (any rank, as some exporters write), MatMul by 8x4."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "unranked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return _model(graph)


def with_strings() -> onnx.ModelProto:
    """y = x + 1 (float) and ys = the same values as strings, which the wire cannot carry."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]),
         helper.make_node("Cast", ["y"], ["ys"], to=TensorProto.STRING)], "with_strings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("ys", TensorProto.STRING, ["n"])], [one])
    return _model(graph)


def string_input() -> onnx.ModelProto:
    """y = float(x) for a string input x: no request could ever send x."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "string_input",
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    return _model(graph)


def overridable(seed: int = 6) -> onnx.ModelProto:
    """y = x @ w * scale, where scale is an initializer also listed as a graph input: ORT
    lets a run feed it (an optional input) or use the stored value."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "scale")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Mul", ["xw", "scale"], ["y"])], "overridable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return _model(graph)


def ir3_shared_constants(seed: int = 12) -> onnx.ModelProto:
    """y = (x @ w + a) * b, IR version 3: every initializer is listed as a graph input too (as
    IR < 4 required) and a == b, so ORT's ConstantSharing merges them, leaving one name in the
    optimized graph's inputs with no initializer behind it (onnx's light_* models)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1.5], np.float32), "a"),
             numpy_helper.from_array(np.array([1.5], np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "a"], ["t"]),
         helper.make_node("Mul", ["t", "b"], ["y"])], "ir3_shared_constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         *(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    model = _model(graph, opset=7)
    model.ir_version = 3
    return model


def multi_io(seed: int = 3) -> onnx.ModelProto:
    """Two inputs with dynamic dims, three outputs of different dtypes (float, int64, float16)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["sum"]),
        helper.make_node("ArgMax", ["sum"], ["best"], axis=-1, keepdims=0),
        helper.make_node("Cast", ["sum"], ["half"], to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", 6]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", "seq", 4]),
         helper.make_tensor_value_info("best", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", "seq", 4])],
        [numpy_helper.from_array(w, "w")])
    return _model(graph)


def int_and_half(seed: int = 4) -> onnx.ModelProto:
    """Integer arithmetic on int32 with an int32 weight, and a float16 MatMul path."""
    rng = np.random.default_rng(seed)
    iw = rng.integers(-50, 50, (5,), dtype=np.int32)
    hw = rng.standard_normal((5, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Mul", ["ints", "iw"], ["scaled"]),
        helper.make_node("MatMul", ["halves", "hw"], ["hout"]),
    ]
    graph = helper.make_graph(
        nodes, "int_and_half",
        [helper.make_tensor_value_info("ints", TensorProto.INT32, ["n", 5]),
         helper.make_tensor_value_info("halves", TensorProto.FLOAT16, ["n", 5])],
        [helper.make_tensor_value_info("scaled", TensorProto.INT32, ["n", 5]),
         helper.make_tensor_value_info("hout", TensorProto.FLOAT16, ["n", 3])],
        [numpy_helper.from_array(iw, "iw"), numpy_helper.from_array(hw, "hw")])
    return _model(graph)


def echo(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Identity on a 1-D input of any length: for big round trips (no weights)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "echo",
        [helper.make_tensor_value_info("x", dtype, ["n"])],
        [helper.make_tensor_value_info("y", dtype, ["n"])],
        [numpy_helper.from_array(np.zeros(1, np.float32), "unused")])
    return _model(graph)


def slow(size: int = 768, layers: int = 6, seed: int = 5) -> onnx.ModelProto:
    """A chain of square MatMuls: a few ms per batch-64 call, to keep a worker busy."""
    return mlp(tuple([size] * (layers + 1)), seed=seed)


def text_output(size: int = 768, layers: int = 4, seed: int = 6) -> onnx.ModelProto:
    """``slow``'s chain of MatMuls with its output cast to strings: a few ms per call (run in
    the worker's pool) and an output dtype the wire cannot carry."""
    model = slow(size, layers, seed)
    graph = model.graph
    graph.node[-1].output[0] = "y_float"
    graph.node.append(helper.make_node("Cast", ["y_float"], ["y"], to=TensorProto.STRING))
    graph.output[0].type.tensor_type.elem_type = TensorProto.STRING
    return model


def embedding(vocab: int = 10, width: int = 4, seed: int = 8) -> onnx.ModelProto:
    """Gather rows of a table by int64 ids: an id past the table fails only when it runs."""
    table = np.random.default_rng(seed).standard_normal((vocab, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(table, "table")])
    return _model(graph)


def labelled(seed: int = 9) -> onnx.ModelProto:
    """An MLP's scores (y) and a small STRING initializer of labels picked by argmax (label):
    the labels stay in the graph, since a segment holds no strings."""
    model = mlp((8, 16, 3), seed=seed)
    graph = model.graph
    graph.initializer.append(helper.make_tensor("labels", TensorProto.STRING, [3],
                                                [b"cat", b"dog", b"eel"]))
    graph.node.extend([helper.make_node("ArgMax", ["y"], ["best"], axis=1, keepdims=0),
                       helper.make_node("Gather", ["labels", "best"], ["label"])])
    graph.output.append(helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]))
    return model


def quantized(element_type: int, seed: int = 10) -> onnx.ModelProto:
    """y = x @ DequantizeLinear(Wq, scale): Wq (128x128, over a page) of ``element_type``
    (FLOAT8E4M3FN or INT4) stays as it is through ORT's optimizer, since the scale is an
    input."""
    rng = np.random.default_rng(seed)
    if element_type == TensorProto.INT4:
        nibbles = rng.integers(0, 16, 128 * 128, dtype=np.uint8)
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        raw = rng.integers(0, 0x70, 128 * 128, dtype=np.uint8).tobytes()
    weight = helper.make_tensor("Wq", element_type, [128, 128], raw, raw=True)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]),
         helper.make_node("MatMul", ["x", "W"], ["y"])], "quantized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 128])], [weight])
    model = _model(graph, opset=21)
    model.ir_version = 10
    return model
