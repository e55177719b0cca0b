"""The weights ORT keeps mapped, on 2 MiB pages: the builder's collapse, ORT's mmap redirected
to congruent addresses, the worker's collapse. In real processes and real /dev/shm files
(the redirect rewrites a pointer in ORT's library, so it runs in a child, never in the runner)."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from shmcache import Client, hugemap
from tests import models
from tests.supervisor.daemon import serving
from worker import aligned_maps

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


@functools.cache
def collapse_works() -> bool:
    """Whether this kernel collapses tmpfs pages on request (MADV_COLLAPSE, Linux 6.1)."""
    path = f"/dev/shm/shmcache-test-probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(path, "wb") as f:
            f.write(b"\1" * (4 * MIB))
        return hugemap.collapse_file(path, [(0, 4 * MIB)]) > 0
    finally:
        os.unlink(path)


needs_collapse = pytest.mark.skipif(not collapse_works(),
                                    reason="the kernel refuses MADV_COLLAPSE on tmpfs")


@pytest.fixture
def shm_file() -> Iterator[str]:
    path = f"/dev/shm/shmcache-test-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def pmd_mapped(pid: int | str = "self") -> int:
    """Bytes of tmpfs pages the process maps 2 MiB at a time."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("ShmemPmdMapped:"):
                return int(line.split()[1]) * 1024
    return 0


def test_whole_huge_pages_are_the_aligned_inside_of_a_range() -> None:
    two = hugemap.HUGE_PAGE
    assert hugemap.whole_huge_pages(4096, 5 * two - 4096) == (two, 4 * two)
    assert hugemap.whole_huge_pages(0, 2 * two) == (0, 2 * two)
    a, b = hugemap.whole_huge_pages(4096, two + 4096)  # 2 MiB long, but straddling
    assert b <= a


def test_ort_library_calls_mmap_through_a_relocation() -> None:
    import onnxruntime.capi.onnxruntime_pybind11_state as binding

    assert aligned_maps.relocation_offsets(binding.__file__, aligned_maps.MMAP_SYMBOLS)


def test_files_that_are_not_x86_64_shared_objects_have_no_slots(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("mmap mmap mmap")
    arm = tmp_path / "arm.so"
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    arm.write_bytes(bytes(header))
    assert aligned_maps.relocation_offsets(str(text), aligned_maps.MMAP_SYMBOLS) == []
    assert aligned_maps.relocation_offsets(str(arm), aligned_maps.MMAP_SYMBOLS) == []


def test_a_congruent_mapping_reads_the_file(shm_file: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, 5 * MIB, np.uint8)
    Path(shm_file).write_bytes(data.tobytes())
    offset = 3 * 4096  # not a multiple of 2 MiB: the address must follow it
    fd = os.open(shm_file, os.O_RDONLY)
    try:
        addr = hugemap.map_congruent(4 * MIB, hugemap.PROT_READ, hugemap.MAP_SHARED, fd, offset)
    finally:
        os.close(fd)
    assert addr != hugemap.MAP_FAILED
    try:
        assert (addr - offset) % hugemap.HUGE_PAGE == 0
        assert ctypes.string_at(addr, 4 * MIB) == data[offset:offset + 4 * MIB].tobytes()
    finally:
        hugemap.libc().munmap(addr, 4 * MIB)


@needs_collapse
def test_collapsed_file_is_mapped_huge_where_congruent(shm_file: str) -> None:
    Path(shm_file).write_bytes(b"\7" * (8 * MIB))
    # Only the whole 2 MiB pages inside each range; short ranges not at all.
    assert hugemap.collapse_file(shm_file, [(4096, 6 * MIB), (7 * MIB, MIB)]) == 4 * MIB
    fd = os.open(shm_file, os.O_RDONLY)
    addr = hugemap.map_congruent(8 * MIB, hugemap.PROT_READ, hugemap.MAP_SHARED, fd, 0)
    os.close(fd)
    try:
        before = pmd_mapped()
        assert hugemap.collapse_range(addr, 8 * MIB) == 8 * MIB
        assert pmd_mapped() - before == 8 * MIB
    finally:
        hugemap.libc().munmap(addr, 8 * MIB)


def build_segment(tmp_path: Path, model: Path, name: str, huge: bool) -> dict[str, object]:
    cmd = [sys.executable, "-m", "supervisor.build", "--model-path", str(model),
           "--model-name", "m", "--segment", name, "--version", "1",
           "--owner-pid", str(os.getpid()), "--prepack-cache", str(tmp_path / "cache")]
    out = subprocess.run(cmd + (["--huge-pages"] if huge else []), capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result.get("prepacked"), (result, out.stderr)
    return result


WORKER_SIDE = """
    import json, numpy as np
    from worker import aligned_maps
    from worker.runtime import ModelRuntime, SessionSettings
    installed = aligned_maps.install() if {install} else "not asked"
    runtime = ModelRuntime.open({segment!r}, SessionSettings(intra_op_threads=1))
    done, possible = aligned_maps.collapse_mapped({segment!r})
    congruent = [(s - o) % (2 << 20) == 0 for s, e, o in aligned_maps._mappings_of(
        "/dev/shm/" + {segment!r}) if e - s >= (2 << 20)]
    pairs, _ = runtime.run({{"x": np.load({feed!r})}}, None)
    np.save({out!r}, pairs[0][1])
    print(json.dumps({{"installed": installed, "done": done, "possible": possible,
                      "congruent": congruent}}))
"""


def open_in_child(tmp_path: Path, segment: str, install: bool) -> tuple[dict, np.ndarray]:
    feed, out = tmp_path / "x.npy", tmp_path / f"y-{install}.npy"
    np.save(feed, np.random.default_rng(1).standard_normal((4, 1024)).astype(np.float32))
    code = WORKER_SIDE.format(install=install, segment=segment, feed=str(feed), out=str(out))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), np.load(out)


@needs_collapse
def test_a_worker_maps_the_pre_packed_weights_huge_and_answers_the_same(tmp_path: Path) -> None:
    model = models.save(models.mlp((1024, 1024, 8)), tmp_path / "m.onnx")  # a 4 MiB weight
    name = f"shmcache-test-{uuid.uuid4().hex[:8]}"
    build_segment(tmp_path, model, name, huge=True)
    try:
        report, with_hook = open_in_child(tmp_path, name, install=True)
        assert report["installed"] is None
        assert report["congruent"] and all(report["congruent"])
        assert report["possible"] >= 2 * MIB and report["done"] == report["possible"]
        _, without = open_in_child(tmp_path, name, install=False)
    finally:
        os.unlink(f"/dev/shm/{name}")
    x = np.load(tmp_path / "x.npy")
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert np.array_equal(with_hook, without)
    np.testing.assert_allclose(with_hook, reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


@needs_collapse
def test_daemon_workers_map_weights_huge_unless_told_not_to(tmp_path: Path) -> None:
    model = models.save(models.mlp((1024, 1024, 8)), tmp_path / "m.onnx")
    for flags, huge in (([], True), (["--no-huge-pages"], False)):
        run = tmp_path / ("on" if huge else "off")
        run.mkdir()
        with serving(run, {"m": model}, workers=1, extra=flags) as daemon:
            (pid,) = daemon.worker_pids()
            assert (pmd_mapped(pid) >= 2 * MIB) is huge, daemon.log_text()
            with Client(str(daemon.socket)) as client:
                y = client.run("m", None, {"x": np.ones((2, 1024), np.float32)})[0]
            assert y.shape == (2, 8)
