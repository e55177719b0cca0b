"""The durable copy of a published version: complete on its own, and its digest read once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import numpy_helper

from shmcache import model as model_module
from shmcache.model import load_model, scan_model_file
from supervisor.build import copy_whole_file, keep, partial_copy, persist
from tests import models

ROOT = Path(__file__).resolve().parents[2]


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
    copied = copy_whole_file(embedded, dest)
    assert copied is not None
    tmp, digest = copied
    assert tmp == partial_copy(dest) and not dest.exists()  # complete only once kept
    keep(tmp, dest)
    assert dest.read_bytes() == embedded.read_bytes()
    assert digest == sha256(dest)
    assert not tmp.exists()


def test_file_with_external_data_is_saved_whole(external: Path, tmp_path: Path) -> None:
    expected = weights(load_model(external))
    dest = tmp_path / "state" / "v2.onnx"
    assert copy_whole_file(external, dest) is None  # not whole: saved from the loaded model
    assert not partial_copy(dest).exists()
    digest = persist(load_model(external), dest)
    # Complete on its own: the source folder (and its .data file) is gone.
    (external.parent / "external.data").unlink()
    assert scan_model_file(dest).self_contained
    copy = onnx.load(str(dest))
    got = weights(copy)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    assert digest == sha256(dest)


def test_scan_can_copy_in_the_same_pass(embedded: Path, external: Path, tmp_path: Path) -> None:
    for source in (embedded, external):
        copy = tmp_path / f"copy-{source.name}"
        scan = scan_model_file(source, copy_to=copy)
        assert copy.read_bytes() == source.read_bytes()
        assert scan == scan_model_file(source)


def test_the_builder_is_niced_before_its_imports(tmp_path: Path) -> None:
    """A publish's build is background work from its first instruction: run as the helper
    process, it raises its nice value before importing onnx (whose import alone takes ~0.4 s
    of CPU), and still reports a missing file as a failed build."""
    from supervisor.build import BUILD_NICENESS

    probe = f"""
import json, os, runpy, sys
calls = []
real_nice = os.nice
def spy(n):
    calls.append(["onnx" in sys.modules, n])
    return real_nice(n)
os.nice = spy
sys.argv = ["build", "--model-path", {str(tmp_path / "absent.onnx")!r}, "--model-name", "m",
            "--segment", "shmcache-test-nice", "--version", "1", "--owner-pid", str(os.getppid())]
try:
    runpy.run_module("supervisor.build", run_name="__main__")
except SystemExit as exc:
    print(json.dumps({{"calls": calls, "code": exc.code,
                       "nice": os.getpriority(os.PRIO_PROCESS, 0)}}))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["calls"] == [[False, BUILD_NICENESS]]
    assert report["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + BUILD_NICENESS)
    assert report["code"] == 1 and "does not exist" in done.stdout


def test_the_builder_dies_with_its_owner(tmp_path: Path) -> None:
    """A supervisor killed mid-publish takes its builder along: an orphan would finish a
    segment and a weight copy under a version number the restarted daemon may issue again.
    The builder is stopped (SIGSTOP) once it reads the model, past its set-up, then its owner
    is killed: only the kernel's parent-death signal can end it then."""
    model = models.save(models.mlp((2048, 4096), seed=9), tmp_path / "m.onnx")  # 32 MiB
    owner = f"""
import os, subprocess, sys, time
builder = subprocess.Popen([sys.executable, "-m", "supervisor.build", "--model-path", {str(model)!r},
                            "--model-name", "m", "--segment", "shmcache-test-orphan",
                            "--version", "2", "--owner-pid", str(os.getpid())])
print(builder.pid, flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", owner], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    builder = psutil.Process(int(proc.stdout.readline()))
    try:
        deadline = time.monotonic() + 30
        while not any(f.path == str(model) for f in builder.open_files()):
            assert time.monotonic() < deadline, "the builder never opened the model"
            time.sleep(0.002)
        builder.suspend()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while builder.is_running() and builder.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the builder outlived its owner"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if builder.is_running():
            builder.kill()
        Path("/dev/shm/shmcache-test-orphan").unlink(missing_ok=True)
