"""The durable copy of a published version: complete on its own, and its digest read once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from shmcache import model as model_module
from shmcache.model import load_model, scan_model_file
from supervisor.build import persist
from tests import models


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def embedded(tmp_path: Path) -> Path:
    return models.save(models.mlp((64, 128, 32), seed=3), tmp_path / "embedded.onnx")


@pytest.fixture
def external(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "external.onnx"
    path.parent.mkdir()
    onnx.save(models.mlp((64, 128, 32), seed=3), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="external.data", size_threshold=0)
    return path


def test_scan_tells_external_data_from_embedded(embedded: Path, external: Path) -> None:
    assert scan_model_file(embedded).self_contained
    assert not scan_model_file(external).self_contained
    assert scan_model_file(embedded).digest == sha256(embedded)
    assert scan_model_file(external).digest == sha256(external)


@pytest.mark.parametrize("chunk", [len(model_module.EXTERNAL_LOCATION_KEY) + k for k in range(12)])
def test_scan_finds_a_reference_across_chunk_boundaries(
        external: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "SCAN_CHUNK", chunk)
    scan = scan_model_file(external)
    assert not scan.self_contained
    assert scan.digest == sha256(external)


def test_self_contained_file_is_copied_byte_for_byte(embedded: Path, tmp_path: Path) -> None:
    dest = tmp_path / "state" / "v2.onnx"
    digest = persist(load_model(embedded), embedded, dest)
    assert dest.read_bytes() == embedded.read_bytes()
    assert digest == sha256(dest)
    assert not dest.with_suffix(".tmp").exists()


def test_file_with_external_data_is_saved_whole(external: Path, tmp_path: Path) -> None:
    expected = weights(load_model(external))
    dest = tmp_path / "state" / "v2.onnx"
    digest = persist(load_model(external), external, dest)
    # Complete on its own: the source folder (and its .data file) is gone.
    (external.parent / "external.data").unlink()
    assert scan_model_file(dest).self_contained
    copy = onnx.load(str(dest))
    got = weights(copy)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    assert digest == sha256(dest)
