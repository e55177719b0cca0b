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

from shmcache import Client, hugemap, libc
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


def test_ort_library_calls_mmap_through_a_slot_holding_libcs_mmap() -> None:
    import onnxruntime.capi.onnxruntime_pybind11_state as binding

    assert aligned_maps.relocation_offsets(binding.__file__, aligned_maps.MMAP_SYMBOLS)
    slots, path = aligned_maps._mmap_slots()  # reads only: nothing is rewritten here
    assert slots and path == os.path.realpath(binding.__file__)


def test_install_says_why_not_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[list[int], str]:
        raise IndexError("a truncated section table")

    monkeypatch.setattr(aligned_maps, "_mmap_slots", broken)
    monkeypatch.setattr(aligned_maps, "_state", {})
    assert "IndexError" in (aligned_maps.install() or "")
    assert not aligned_maps.installed()
    monkeypatch.setattr(aligned_maps, "_mmap_slots", lambda: ([], "/x/libort.so"))
    assert "no pointer to libc's mmap" in (aligned_maps.install() or "")


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
    stub = tmp_path / "stub.so"
    stub.write_bytes(b"\x7fELF")  # truncated
    assert aligned_maps.relocation_offsets(str(stub), aligned_maps.MMAP_SYMBOLS) == []
    huge_table = bytearray(header)
    huge_table[18:20] = (62).to_bytes(2, "little")  # x86-64, section table far past the end
    huge_table[40:48] = (2**62).to_bytes(8, "little")
    huge_table[58:62] = (64).to_bytes(2, "little") + (100).to_bytes(2, "little")
    stub.write_bytes(bytes(huge_table))
    assert aligned_maps.relocation_offsets(str(stub), aligned_maps.MMAP_SYMBOLS) == []
    assert aligned_maps.first_load_vaddr(str(text)) is None


def mappings_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_the_redirect_passes_every_other_call_through(shm_file: str, tmp_path: Path) -> None:
    """Called as ORT would call it (through the C callback type): what it does not place is
    mmap's own result, errno included."""
    hook = aligned_maps._MMAP_TYPE(aligned_maps.congruent_mmap)
    Path(shm_file).write_bytes(b"\5" * (3 * MIB))
    elsewhere = tmp_path / "weights.bin"
    elsewhere.write_bytes(b"\6" * (3 * MIB))
    prot, private = hugemap.PROT_READ, hugemap.MAP_PRIVATE
    for path, length, flags, byte in ((shm_file, MIB, private, 5),  # under 2 MiB
                                      (str(elsewhere), 3 * MIB, private, 6)):  # not /dev/shm
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = hook(None, length, prot, flags, fd, 0)
            assert addr not in (None, libc.MAP_FAILED)
            assert ctypes.string_at(addr, 16) == bytes([byte]) * 16
            libc.libc().munmap(addr, length)
        finally:
            os.close(fd)
    anon = hook(None, 4 * MIB, 3, private | hugemap.MAP_ANONYMOUS, -1, 0)
    assert anon not in (None, libc.MAP_FAILED)
    libc.libc().munmap(anon, 4 * MIB)
    ctypes.set_errno(0)
    assert hook(None, 4 * MIB, prot, private, 987654, 0) == libc.MAP_FAILED
    assert ctypes.get_errno() == 9  # EBADF, as mmap said


def test_a_placement_that_raises_maps_as_asked_and_a_failure_is_clean(
        shm_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Path(shm_file).write_bytes(b"\5" * (4 * MIB))
    monkeypatch.setitem(aligned_maps._state, "shm_dev", os.stat("/dev/shm").st_dev)
    fd = os.open(shm_file, os.O_RDONLY)
    try:
        def boom(*args: object) -> int:
            raise MemoryError

        monkeypatch.setattr(hugemap, "map_congruent", boom)
        addr = aligned_maps.congruent_mmap(None, 4 * MIB, hugemap.PROT_READ,
                                           hugemap.MAP_PRIVATE, fd, 0)
        assert addr != libc.MAP_FAILED and ctypes.string_at(addr, 4) == b"\5" * 4
        libc.libc().munmap(addr, 4 * MIB)
        monkeypatch.setattr(libc, "sys_mmap", boom)
        assert aligned_maps.congruent_mmap(None, 4 * MIB, hugemap.PROT_READ,
                                           hugemap.MAP_PRIVATE, fd, 0) == libc.MAP_FAILED
    finally:
        os.close(fd)


def test_storing_a_pointer_gives_the_page_back_its_permissions() -> None:
    for prot, perms in ((3, "rw"), (hugemap.PROT_READ, "r-")):
        page = libc.sys_mmap(None, hugemap.PAGE, 3,
                                hugemap.MAP_PRIVATE | hugemap.MAP_ANONYMOUS, -1, 0)
        try:
            libc.libc().mprotect(page, hugemap.PAGE, prot)
            assert aligned_maps._store_pointer(page + 8, 0x1234)
            assert ctypes.c_void_p.from_address(page + 8).value == 0x1234
            with open("/proc/self/maps") as f:  # the page may have merged with a neighbour
                line = next(ln for ln in f if int(ln.split("-")[0], 16) <= page
                            < int(ln.split()[0].split("-")[1], 16))
            assert line.split()[1].startswith(perms)
        finally:
            libc.libc().munmap(page, hugemap.PAGE)


def test_a_congruent_mapping_reads_the_file(shm_file: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, 5 * MIB, np.uint8)
    Path(shm_file).write_bytes(data.tobytes())
    offset = 3 * 4096  # not a multiple of 2 MiB: the address must follow it
    fd = os.open(shm_file, os.O_RDONLY)
    try:
        addr = hugemap.map_congruent(4 * MIB, hugemap.PROT_READ, hugemap.MAP_SHARED, fd, offset)
    finally:
        os.close(fd)
    assert addr != libc.MAP_FAILED
    try:
        assert (addr - offset) % hugemap.HUGE_PAGE == 0
        assert ctypes.string_at(addr, 4 * MIB) == data[offset:offset + 4 * MIB].tobytes()
    finally:
        libc.libc().munmap(addr, 4 * MIB)
    before = mappings_count()
    fd = os.open(shm_file, os.O_RDONLY)
    addr = hugemap.map_congruent(4 * MIB + 100, hugemap.PROT_READ, hugemap.MAP_SHARED, fd, 0)
    os.close(fd)
    libc.libc().munmap(addr, 4 * MIB + 100)
    assert mappings_count() == before  # the reservation's head and tail went too


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
        libc.libc().munmap(addr, 8 * MIB)


def build_segment(tmp_path: Path, model: Path, name: str, huge: bool) -> dict[str, object]:
    cmd = [sys.executable, "-m", "supervisor.build", "--model-path", str(model),
           "--model-name", "m", "--segment", name, "--version", "1",
           "--owner-pid", str(os.getpid()), "--prepack-cache", str(tmp_path / "cache")]
    out = subprocess.run(cmd + (["--huge-pages"] if huge else []), capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result.get("prepacked"), (result, out.stderr)
    return result


# Two sessions over the segment created at once, in two threads, while a third Python thread
# keeps the GIL busy: ORT's mmap calls come back into Python from both (a deadlock would hang
# here, and the parent's timeout fails the test).
WORKER_SIDE = """
    import json, threading, numpy as np
    from worker import aligned_maps
    from worker.runtime import ModelRuntime, SessionSettings
    installed = aligned_maps.install() if {install} else "not asked"
    stop = False
    def busy():
        n = 0
        while not stop:
            n += 1
    spinner = threading.Thread(target=busy)
    spinner.start()
    runtimes = [None, None]
    def open_one(i):
        with aligned_maps.gc_paused():
            runtimes[i] = ModelRuntime.open({segment!r}, SessionSettings(intra_op_threads=1))
    openers = [threading.Thread(target=open_one, args=(i,)) for i in range(2)]
    for t in openers: t.start()
    for t in openers: t.join()
    stop = True
    spinner.join()
    congruent = [(s - o) % (2 << 20) == 0 for s, e, o in aligned_maps._mappings_of(
        "/dev/shm/" + {segment!r}) if e - s >= (2 << 20)]
    done, possible = aligned_maps.collapse_mapped({segment!r})
    x = np.load({feed!r})
    outs = [r.run({{"x": x}}, None)[0][0][1] for r in runtimes]
    assert outs[0].tobytes() == outs[1].tobytes()
    np.save({out!r}, outs[0])
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


def test_a_worker_maps_the_weights_congruent_and_answers_the_same(tmp_path: Path) -> None:
    model = models.save(models.mlp((1024, 1024, 8)), tmp_path / "m.onnx")  # a 4 MiB weight
    name = f"shmcache-test-{uuid.uuid4().hex[:8]}"
    built = build_segment(tmp_path, model, name, huge=True)
    try:
        report, with_hook = open_in_child(tmp_path, name, install=True)
        _, without = open_in_child(tmp_path, name, install=False)
    finally:
        os.unlink(f"/dev/shm/{name}")
    assert report["installed"] is None
    # Both sessions' mappings of the blob (and of nothing smaller than 2 MiB) are congruent.
    assert len(report["congruent"]) >= 2 and all(report["congruent"])
    if collapse_works():
        assert built["huge_bytes"] >= 2 * MIB  # the builder collapsed the page cache
        assert report["possible"] >= 4 * MIB and report["done"] == report["possible"]
    x = np.load(tmp_path / "x.npy")
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert np.array_equal(with_hook, without)
    np.testing.assert_allclose(with_hook, reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_the_builder_collapses_only_when_asked(tmp_path: Path) -> None:
    model = models.save(models.mlp((1024, 1024, 8)), tmp_path / "m.onnx")
    name = f"shmcache-test-{uuid.uuid4().hex[:8]}"
    try:
        assert "huge_bytes" not in build_segment(tmp_path, model, name, huge=False)
    finally:
        os.unlink(f"/dev/shm/{name}")


@needs_collapse
def test_daemon_workers_map_weights_huge_unless_told_not_to(tmp_path: Path) -> None:
    """At boot and for a published version (whose session a worker creates while serving)."""
    model = models.save(models.mlp((1024, 1024, 8)), tmp_path / "m.onnx")
    update = models.save(models.mlp((1024, 1024, 8), seed=3), tmp_path / "m2.onnx")
    for flags, huge in (([], True), (["--no-huge-pages"], False)):
        run = tmp_path / ("on" if huge else "off")
        run.mkdir()
        with serving(run, {"m": model}, workers=1, extra=flags) as daemon:
            (pid,) = daemon.worker_pids()
            assert (pmd_mapped(pid) >= 2 * MIB) is huge, daemon.log_text()
            published = subprocess.run(
                [sys.executable, "-m", "shmcache.cli", "publish", "m", str(update), "--socket",
                 str(daemon.socket)], capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert published.returncode == 0, published.stderr
            with Client(str(daemon.socket)) as client:
                (y,), version = client.run_with_version(
                    "m", None, {"x": np.ones((2, 1024), np.float32)})
            assert version == 2 and y.shape == (2, 8)
            v2 = [line for line in daemon.log_text().splitlines() if "m v2: " in line]
            if huge:  # the whole 2 MiB pages of the 4 MiB blob, all of them
                assert v2 and " 0 of " not in v2[-1], daemon.log_text()
                assert pmd_mapped(pid) >= 2 * MIB
            else:
                assert not v2 and pmd_mapped(pid) == 0
