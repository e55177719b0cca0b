#!/usr/bin/env python3
"""Generate the small model that ships with shmcache (shmcache/models/embedded.onnx).

Deterministic: a fixed seed and a fixed opset, so re-running this script reproduces the
committed file byte for byte. The model is a 3-layer MLP classifier (128 -> 512 -> 512 -> 16,
ReLU, softmax) with a dynamic batch dimension: big enough that sharing its weights shows in the
memory figures (1.3 MB of float32), small enough to commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "shmcache" / "models" / "embedded.onnx"
SIZES = (128, 512, 512, 16)


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(20261128)
    nodes, inits, x = [], [], "features"
    for i, (fan_in, fan_out) in enumerate(zip(SIZES, SIZES[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"dense{i}.weight"),
                  numpy_helper.from_array(b, f"dense{i}.bias")]
        nodes.append(helper.make_node("Gemm", [x, f"dense{i}.weight", f"dense{i}.bias"], [f"h{i}"]))
        x = f"h{i}"
        if i < len(SIZES) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes, "embedded_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="shmcache-make-model")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
