"""Publish candidates: ONNX files checked by signature, weights files laid over the served graph."""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from shmcache.candidate import (
    MAX_HEADER_BYTES,
    Signature,
    TensorSig,
    check_callable,
    load_candidate,
    save_safetensors,
    signature_differences,
    signature_of,
)
from shmcache.errors import ModelError, SignatureMismatch, WeightsError
from shmcache.model import build_model_segment
from shmcache.segment import OwnedSegment, Segment
from tests import models

SHM = Path("/dev/shm")


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Served:
    segment: Segment
    graph: bytes
    tensor: Callable[[str], np.ndarray]


@pytest.fixture
def segments() -> Iterator[Callable[[onnx.ModelProto], Served]]:
    """Build real segments (as the supervisor does); unlink every one at teardown."""
    owned: list[OwnedSegment] = []
    attached: list[Segment] = []

    def build(model: onnx.ModelProto) -> Served:
        name = f"shmcache.00000000.{os.getpid()}.t.v1.{secrets.token_hex(3)}"
        owned.append(build_model_segment(model, name=name, model_name="t", version=1))
        seg = Segment.attach(name)
        attached.append(seg)
        return Served(seg, seg.graph_bytes(), seg.tensor)

    yield build
    for seg in attached:
        seg.close()
    for o in owned:
        o.unlink()
    assert not [o.name for o in owned if (SHM / o.name).exists()]


def session_on(served: Served) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", "/dev/shm")
    return ort.InferenceSession(served.graph, so, providers=["CPUExecutionProvider"])


def reference(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def with_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    return copy


def embedded(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer of every graph, each of which must be embedded (no external data)."""
    out: dict[str, np.ndarray] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            assert t.data_location != TensorProto.EXTERNAL and not t.external_data, t.name
            out[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
    walk(model.graph)
    return out


def new_mlp_weights(seed: int = 9) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w0": rng.standard_normal((16, 32)).astype(np.float32),
            "b1": rng.standard_normal(8).astype(np.float32)}


def mlp_safetensors(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "w.safetensors"
    save_safetensors(path, arrays or new_mlp_weights())
    return path


# --- signatures -------------------------------------------------------------------------------


def test_signature_of_excludes_initializers_and_reads_every_kind_of_dim() -> None:
    model = models.mlp()
    # IR < 4 style: an initializer also listed as a graph input is not something callers feed.
    model.graph.input.append(helper.make_tensor_value_info("w0", TensorProto.FLOAT, [16, 32]))
    model.graph.output.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, None))
    model.graph.output.append(helper.make_tensor_value_info("m0", TensorProto.FLOAT, [None, 32]))
    sig = signature_of(model)
    assert sig.inputs == (TensorSig("x", TensorProto.FLOAT, ("batch", 16)),)
    assert sig.outputs == (
        TensorSig("y", TensorProto.FLOAT, ("batch", 8)),
        TensorSig("r0", TensorProto.FLOAT, None),
        TensorSig("m0", TensorProto.FLOAT, (None, 32)),
    )


def test_signature_of_non_tensor_types() -> None:
    model = models.mlp()
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model.graph.output.append(seq)
    assert signature_of(model).outputs[-1] == TensorSig("s", 0, None, "seq(tensor(float))")


def test_differences_each_on_its_own_line() -> None:
    x = TensorSig("x", TensorProto.FLOAT, ("batch", 128))
    y = TensorSig("y", TensorProto.FLOAT, ("batch", 8))
    z = TensorSig("z", TensorProto.INT64, ("batch",))
    old = Signature((x,), (y, z))
    new = Signature((TensorSig("x", TensorProto.DOUBLE, ("batch", 256)),), (y,))
    assert signature_differences(old, new) == [
        "input 'x': dtype FLOAT -> DOUBLE",
        "input 'x' dim 1: 128 -> 256",
        "output 'z' removed",
    ]
    assert signature_differences(old, old) == []


def test_differences_rank_unknown_added_reordered_and_fixed_vs_dynamic() -> None:
    a = TensorSig("a", TensorProto.FLOAT, ("n", 4))
    b = TensorSig("b", TensorProto.FLOAT, ("n",))
    old = Signature((a,), (a, b))
    new = Signature(
        (TensorSig("a", TensorProto.FLOAT, ("n", 4, 1)), TensorSig("extra", 1, (1,))),
        (b, TensorSig("a", TensorProto.FLOAT, None)),
    )
    assert signature_differences(old, new) == [
        "input 'a': rank 2 -> 3 (shape ['n', 4] -> ['n', 4, 1])",
        "input 'extra' added",
        "output 'a': shape ['n', 4] -> unknown",
        "outputs reordered: ['a', 'b'] -> ['b', 'a']",
    ]
    fixed = Signature((TensorSig("a", TensorProto.FLOAT, (1, 4)),), (b,))
    assert signature_differences(Signature((a,), (b,)), fixed) == ["input 'a' dim 0: 'n' -> 1"]


def test_renamed_dynamic_dims_are_no_difference() -> None:
    old = Signature((TensorSig("x", 1, ("batch", 16)),), ())
    new = Signature((TensorSig("x", 1, ("N", 16)),), ())
    unnamed = Signature((TensorSig("x", 1, (None, 16)),), ())
    assert signature_differences(old, new) == signature_differences(old, unnamed) == []


# --- ONNX candidates --------------------------------------------------------------------------


def test_onnx_candidate_with_same_signature_is_returned_with_its_weights(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp(seed=0))
    path = models.save(models.mlp(seed=1), tmp_path / "new.onnx")
    model = load_candidate(path, served.graph, served.tensor)
    expected = embedded(models.mlp(seed=1))
    got = embedded(model)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def _edited(model: onnx.ModelProto, edit: Callable[[onnx.GraphProto], None]) -> onnx.ModelProto:
    edit(model.graph)
    return model


def _retype_x(graph: onnx.GraphProto) -> None:
    graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = 17


def test_onnx_signature_changes_are_refused_listing_each(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.multi_io())
    candidate = models.multi_io(seed=8)
    candidate.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 7
    candidate.graph.input[1].type.tensor_type.elem_type = TensorProto.DOUBLE
    del candidate.graph.output[1]  # 'best'
    path = models.save(candidate, tmp_path / "new.onnx")
    with pytest.raises(SignatureMismatch) as info:
        load_candidate(path, served.graph, served.tensor)
    assert info.value.differences == [
        "input 'a' dim 2: 6 -> 7",
        "input 'b': dtype FLOAT -> DOUBLE",
        "output 'best' removed",
    ]
    for line in info.value.differences:
        assert line in str(info.value)
    assert "--allow-signature-change" in str(info.value)


def test_onnx_signature_change_accepted_when_allowed(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp(seed=0))
    bigger = models.mlp(sizes=(24, 32, 8), seed=3)
    path = models.save(bigger, tmp_path / "new.onnx")
    with pytest.raises(SignatureMismatch, match=r"input 'x' dim 1: 16 -> 24"):
        load_candidate(path, served.graph, served.tensor)
    model = load_candidate(path, served.graph, served.tensor, allow_signature_change=True)
    assert signature_of(model) == signature_of(models.mlp(sizes=(24, 32, 8)))


def test_onnx_candidate_dtype_change_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    path = models.save(_edited(models.mlp(), _retype_x), tmp_path / "new.onnx")
    with pytest.raises(SignatureMismatch) as info:
        load_candidate(path, served.graph)
    assert info.value.differences == ["input 'x': dtype FLOAT -> DOUBLE", "input 'x' dim 1: 16 -> 17"]


@pytest.mark.parametrize("content", [None, b"", b"garbage that is no protobuf \xff\xff", b"\x08\x07"])
def test_missing_or_non_onnx_file_is_a_model_error(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path, content: bytes | None
) -> None:
    served = segments(models.mlp())
    path = tmp_path / "new.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        load_candidate(path, served.graph, served.tensor)
    assert not isinstance(info.value, WeightsError)


def test_truncated_onnx_file_is_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    data = models.mlp(seed=1).SerializeToString()
    for cut in (10, len(data) // 2, len(data) - 3):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError):
            load_candidate(path, served.graph, served.tensor)


# --- weights files: the served graph with new values --------------------------------------------


def test_npz_partial_weights_run_like_a_model_with_those_weights(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp(seed=0))
    new = new_mlp_weights()
    path = tmp_path / "w.npz"
    np.savez(path, **new)
    model = load_candidate(path, served.graph, served.tensor)
    got = embedded(model)
    np.testing.assert_array_equal(got["w0"], new["w0"])
    np.testing.assert_array_equal(got["b1"], new["b1"])
    np.testing.assert_array_equal(got["w1"], embedded(models.mlp(seed=0))["w1"])

    rebuilt = segments(model)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    (out,) = session_on(rebuilt).run(None, {"x": x})
    (want,) = reference(with_initializers(models.mlp(seed=0), new)).run(None, {"x": x})
    (old,) = session_on(served).run(None, {"x": x})
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, old)


def test_safetensors_full_weights_need_no_served_tensors(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp(seed=0))
    full = embedded(models.mlp(seed=5))
    path = tmp_path / "w.safetensors"
    save_safetensors(path, full, metadata={"format": "pt"})
    model = load_candidate(path, served.graph)  # no served_tensors: everything is in the file
    x = np.ones((2, 16), np.float32)
    (out,) = session_on(segments(model)).run(None, {"x": x})
    (want,) = reference(models.mlp(seed=5)).run(None, {"x": x})
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_partial_weights_without_served_tensors_are_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp((16, 128, 32)))  # w0, w1 big enough to live in the segment only
    with pytest.raises(WeightsError, match=r"other 1: 'w1'"):
        load_candidate(mlp_safetensors(tmp_path, w0=np.zeros((16, 128), np.float32)), served.graph)


def test_subgraph_and_hoisted_constant_weights_are_replaced(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.with_constant_and_subgraph())
    rng = np.random.default_rng(4)
    new = {name: rng.standard_normal((32, 32)).astype(np.float32)
           for name in ("c", "then_w", "else_w")}  # top-level Constant, If-branch init, branch Constant
    path = tmp_path / "w.safetensors"
    save_safetensors(path, new)
    session = session_on(segments(load_candidate(path, served.graph, served.tensor)))
    x = rng.standard_normal((3, 32)).astype(np.float32)
    for flag, branch in ((True, "then_w"), (False, "else_w")):
        (y,) = session.run(None, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(y, x @ new["c"] @ new[branch], rtol=1e-5, atol=1e-5)


def test_int_half_and_big_endian_arrays(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.int_and_half())
    iw = np.arange(5, dtype=">i4")  # byte order is storage, not type: accepted
    hw = np.full((5, 3), 0.5, np.float16)
    path = tmp_path / "w.npz"
    np.savez_compressed(path, iw=iw, hw=hw)
    model = load_candidate(path, served.graph, served.tensor)
    got = embedded(model)
    np.testing.assert_array_equal(got["iw"], iw)
    np.testing.assert_array_equal(got["hw"], hw)
    session = session_on(segments(model))
    ints = np.ones((2, 5), np.int32)
    scaled, hout = session.run(None, {"ints": ints, "halves": np.ones((2, 5), np.float16)})
    np.testing.assert_array_equal(scaled, ints * np.arange(5, dtype=np.int32))
    np.testing.assert_array_equal(hout, np.full((2, 3), 2.5, np.float16))


def test_bfloat16_and_bool_weights(segments: Callable[[onnx.ModelProto], Served], tmp_path: Path) -> None:
    served = segments(models.constants({
        "bf": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
    }))
    new = {"bf": np.array([3.0, 0.25], dtype=ml_dtypes.bfloat16), "mask": np.array([False, True])}
    path = tmp_path / "w.safetensors"
    save_safetensors(path, new)
    got = embedded(load_candidate(path, served.graph, served.tensor))
    assert got["bf"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["bf"].astype(np.float32), [3.0, 0.25])
    np.testing.assert_array_equal(got["mask"], [False, True])
    assert got["empty"].shape == (0, 3)

    raw = bytearray(path.read_bytes())
    raw[-1] = 2  # a bool byte numpy and ORT would read differently
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="'mask' holds bytes other than 0 and 1"):
        load_candidate(path, served.graph, served.tensor)


def test_bfloat16_and_float8_from_an_npz(segments: Callable[[onnx.ModelProto], Served],
                                         tmp_path: Path) -> None:
    """numpy saves ml_dtypes arrays as raw bytes ('|V2', '|V1'): taken as the served type of
    that size; a raw type of another size is still refused."""
    served = segments(models.constants({
        "bf": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "f8": np.array([0.5, 4.0], dtype=ml_dtypes.float8_e4m3fn),
    }))
    new = {"bf": np.array([3.0, 0.25], dtype=ml_dtypes.bfloat16),
           "f8": np.array([-1.0, 2.0], dtype=ml_dtypes.float8_e4m3fn)}
    path = tmp_path / "w.npz"
    np.savez(path, **new)
    got = embedded(load_candidate(path, served.graph, served.tensor))
    assert got["bf"].dtype == ml_dtypes.bfloat16 and got["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert got["bf"].tobytes() == new["bf"].tobytes() and got["f8"].tobytes() == new["f8"].tobytes()
    np.savez(path, bf=np.zeros(2, "V4"), f8=new["f8"])
    with pytest.raises(WeightsError, match="'bf'"):
        load_candidate(path, served.graph, served.tensor)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_unknown_names_are_refused_by_name(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path, suffix: str
) -> None:
    served = segments(models.mlp())
    arrays = {**new_mlp_weights(), "w9": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)}
    path = tmp_path / f"w{suffix}"
    np.savez(path, **arrays) if suffix == ".npz" else save_safetensors(path, arrays)
    with pytest.raises(WeightsError, match=r"2 tensors name no initializer .*: 'w9', 'x'"):
        load_candidate(path, served.graph, served.tensor)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("bad, message", [
    (np.zeros((16, 32), np.float64), r"'w0': served F32\[16, 32\], file F64\[16, 32\]"),
    (np.zeros((32, 16), np.float32), r"'w0': served F32\[16, 32\], file F32\[32, 16\]"),
    (np.zeros((16, 32, 1), np.float32), r"'w0': served F32\[16, 32\], file F32\[16, 32, 1\]"),
    (np.zeros((16, 32), np.int32), r"'w0': served F32\[16, 32\], file I32\[16, 32\]"),
])
def test_wrong_dtype_or_shape_is_refused_naming_the_tensor(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path, suffix: str,
    bad: np.ndarray, message: str,
) -> None:
    served = segments(models.mlp())
    path = tmp_path / f"w{suffix}"
    arrays = {"w0": bad, "b0": np.zeros(32, np.float32)}
    np.savez(path, **arrays) if suffix == ".npz" else save_safetensors(path, arrays)
    with pytest.raises(WeightsError, match=message):
        load_candidate(path, served.graph, served.tensor)


def test_npz_object_arrays_and_non_arrays_are_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    path = tmp_path / "w.npz"
    np.savez(path, w0=np.array([{"evil": 1}, None], dtype=object))
    with pytest.raises(WeightsError, match="object or record array"):
        load_candidate(path, served.graph, served.tensor)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w0", b"not an array")
    with pytest.raises(WeightsError, match="not an .npy array"):
        load_candidate(path, served.graph, served.tensor)
    with zipfile.ZipFile(path, "w"):
        pass
    with pytest.raises(WeightsError, match="holds no arrays"):
        load_candidate(path, served.graph, served.tensor)


def test_prepacked_served_graph_refuses_weights(tmp_path: Path) -> None:
    model = models.mlp()
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "x"), ("offset", "0"), ("length", "4"),
                           ("prepacked_0", "MatMul+1|0;4;0")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    with pytest.raises(WeightsError, match="pre-packed"):
        load_candidate(mlp_safetensors(tmp_path), model.SerializeToString(), lambda n: np.zeros(1))


# --- damaged files ----------------------------------------------------------------------------


def _npz_bytes(tmp_path: Path, compressed: bool) -> bytes:
    path = tmp_path / "src.npz"
    (np.savez_compressed if compressed else np.savez)(path, **new_mlp_weights())
    return path.read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_npz_is_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path, compressed: bool
) -> None:
    served = segments(models.mlp())
    data = _npz_bytes(tmp_path, compressed)
    path = tmp_path / "w.npz"
    for cut in (0, 3, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="corrupted or truncated"):
            load_candidate(path, served.graph, served.tensor)


@pytest.mark.parametrize("compressed", [False, True])
def test_flipped_byte_in_npz_data_fails_the_crc(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path, compressed: bool
) -> None:
    served = segments(models.mlp())
    data = bytearray(_npz_bytes(tmp_path, compressed))
    with zipfile.ZipFile(tmp_path / "src.npz") as z:
        info = z.getinfo("w0.npy")
    # Inside w0's stored bytes: past its local header (30 bytes + name + extra), in the data.
    at = info.header_offset + 30 + len(info.filename) + 20 + info.compress_size // 2
    data[at] ^= 0x10
    path = tmp_path / "w.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted or truncated"):
        load_candidate(path, served.graph, served.tensor)


def test_npz_header_claiming_a_huge_shape_is_refused_before_allocation(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    path = tmp_path / "w.npz"
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    npy = b"\x93NUMPY\x01\x00" + len(header.ljust(118)).to_bytes(2, "little") + header.ljust(117) + b"\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w0.npy", npy + b"\0" * 64)
    with pytest.raises(WeightsError):
        load_candidate(path, served.graph, served.tensor)


def _safetensors_file(tmp_path: Path, header: object, data: bytes = b"",
                      length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path = tmp_path / "bad.safetensors"
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


def _info(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, length, message", [
    (b"", b"", 2, "only 0 bytes follow"),
    ({"b1": _info("F32", [8], 0, 32)}, b"\0" * 31, None, "need 32 bytes of data, the file holds 31"),
    ({"b1": _info("F32", [8], 0, 32)}, b"\0" * 33, None, "need 32 bytes of data, the file holds 33"),
    ({"b1": _info("F32", [8], 0, 32)}, b"", MAX_HEADER_BYTES + 1, "over the"),
    ({"b1": _info("F32", [8], 0, 32)}, b"", 10**6, "only"),
    (b"{not json", b"", None, "not JSON"),
    (b"\xff\xfe{}", b"", None, "not JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    (b'{"b1": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b1": 1}', b"\0" * 4,
     None, "appears twice"),
    ({"b1": _info("F32", [8], 0, 16)}, b"\0" * 16, None, "needs 32 bytes"),
    ({"b1": _info("F32", [8], 32, 0)}, b"", None, "not \\[begin, end\\]"),
    ({"b1": _info("F32", [8, -1], 0, 0)}, b"", None, "non-negative"),
    ({"b1": _info("F32", [8.0], 0, 32)}, b"\0" * 32, None, "non-negative integers"),
    ({"b1": _info("F32", [True], 0, 4)}, b"\0" * 4, None, "non-negative integers"),
    ({"b1": _info("F8_E4M3", [8], 0, 8)}, b"\0" * 8, None, "dtype 'F8_E4M3'"),
    ({"b1": {"dtype": "F32", "shape": [8]}}, b"", None, "exactly dtype, shape, data_offsets"),
    ({"b1": _info("F32", [8], 0, 32), "b0": _info("F32", [8], 16, 48)}, b"\0" * 48, None,
     "overlaps"),
    ({"b1": _info("F32", [8], 8, 40)}, b"\0" * 40, None, "leaves a gap"),
    ({"__metadata__": {"a": 1}, "b1": _info("F32", [8], 0, 32)}, b"\0" * 32, None,
     "__metadata__"),
    (b"[" * 100_000 + b"]" * 100_000, b"", None, "not JSON"),
])
def test_damaged_safetensors_are_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path,
    header: object, data: bytes, length: int | None, message: str,
) -> None:
    served = segments(models.mlp())
    path = _safetensors_file(tmp_path, header, data, length)
    with pytest.raises(WeightsError, match=message):
        load_candidate(path, served.graph, served.tensor)


def test_truncated_safetensors_is_refused(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    good = mlp_safetensors(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    for cut in (0, 5, 8, 9, 40, len(good) - 100, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(WeightsError, match="corrupted or truncated"):
            load_candidate(path, served.graph, served.tensor)


def test_safetensors_detected_by_content_and_npz_by_magic(
    segments: Callable[[onnx.ModelProto], Served], tmp_path: Path
) -> None:
    served = segments(models.mlp())
    st_path = mlp_safetensors(tmp_path).rename(tmp_path / "weights.bin")
    np.savez(tmp_path / "w.npz", **new_mlp_weights())
    npz_path = (tmp_path / "w.npz").rename(tmp_path / "weights.onnx")
    for path in (st_path, npz_path):
        got = embedded(load_candidate(path, served.graph, served.tensor))
        np.testing.assert_array_equal(got["w0"], new_mlp_weights()["w0"])


def test_save_safetensors_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.safetensors"
    save_safetensors(path, {"a": np.array([1.0, 2.0], np.float32),
                            "b": np.array([[1, 2]], np.int64).T})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header == {"a": _info("F32", [2], 0, 8), "b": _info("I64", [2, 1], 8, 24)}
    assert raw[8 + n :] == np.array([1.0, 2.0], "<f4").tobytes() + np.array([1, 2], "<i8").tobytes()


# --- fuzzing ----------------------------------------------------------------------------------


_damage = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                         min_size=1, max_size=4)),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
)


def _apply_damage(data: bytes, damage: tuple[str, object]) -> bytes:
    kind, how = damage
    if kind == "cut":
        assert isinstance(how, int)
        return data[: how % (len(data) + 1)]
    out = bytearray(data)
    assert isinstance(how, list)
    for at, mask in how:
        out[at % len(out)] ^= mask
    return bytes(out)


def _load_damaged(served: Served, path: Path) -> None:
    """A damaged file is refused (WeightsError) or loads cleanly with every shape as served."""
    try:
        model = load_candidate(path, served.graph, served.tensor)
    except WeightsError:
        return
    got = embedded(model)
    for name, array in embedded(models.mlp()).items():
        assert got[name].shape == array.shape and got[name].dtype == array.dtype


@pytest.fixture
def mlp_served(segments: Callable[[onnx.ModelProto], Served]) -> Served:
    return segments(models.mlp())


_fuzz = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(damage=_damage)
def test_fuzzed_safetensors_never_raise_another_error(
    mlp_served: Served, tmp_path: Path, damage: tuple[str, object]
) -> None:
    good = tmp_path / "good.safetensors"
    if not good.exists():
        save_safetensors(good, new_mlp_weights(), metadata={"note": "fuzz"})
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_apply_damage(good.read_bytes(), damage))
    _load_damaged(mlp_served, path)


@_fuzz
@given(damage=_damage, compressed=st.booleans())
def test_fuzzed_npz_never_raise_another_error(
    mlp_served: Served, tmp_path: Path, damage: tuple[str, object], compressed: bool
) -> None:
    good = tmp_path / f"good{int(compressed)}.npz"
    if not good.exists():
        (np.savez_compressed if compressed else np.savez)(good, **new_mlp_weights())
    path = tmp_path / "fuzz.npz"
    path.write_bytes(_apply_damage(good.read_bytes(), damage))
    _load_damaged(mlp_served, path)


def test_a_model_no_request_could_run_is_refused() -> None:
    """A required string input can never be sent, nor can a model's only output, if strings:
    refused when the segment is built, not at every call. A string output next to others is
    served (a call asks for the others by name)."""
    with pytest.raises(ModelError, match=r"input\(s\) 'x' \(STRING\) cannot be sent"):
        check_callable(signature_of(models.string_input()))
    check_callable(signature_of(models.with_strings()))
    only_strings = models.with_strings()
    del only_strings.graph.output[0]
    with pytest.raises(ModelError, match="no output can be sent back .*'ys' \\(STRING\\)"):
        check_callable(signature_of(only_strings))
    sequence_in = Signature((TensorSig("s", 0, None, "seq(tensor(float))"),), ())
    with pytest.raises(ModelError, match=r"'s' \(seq\(tensor\(float\)\)\)"):
        check_callable(sequence_in)
    optional_in = Signature((TensorSig("x", TensorProto.FLOAT, (2,)),
                             TensorSig("o", 0, None, "optional(tensor(float))")),
                            (TensorSig("y", TensorProto.FLOAT, (2,)),))
    check_callable(optional_in)  # a call may leave "o" out


def test_save_safetensors_keeps_a_scalar_a_scalar(tmp_path: Path) -> None:
    """A 0-d array (a zero point, a scale) is written with shape [], as the served tensor has it."""
    path = tmp_path / "s.safetensors"
    save_safetensors(path, {"zp": np.array(3, np.int8), "v": np.arange(2, dtype=np.float32)})
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["zp"]["shape"] == [] and header["v"]["shape"] == [2]
