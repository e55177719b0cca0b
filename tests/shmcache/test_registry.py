"""Orphan sweep and the inspect/cleanup commands, with real processes and real segments."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmcache import errors, registry
from shmcache.cli import main as cli_main
from shmcache.model import build_model_segment, load_model
from shmcache.registry import instance_id, segment_name
from tests import models

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")

ORPHAN_MAKER = """
import os, sys
from shmcache.model import build_model_segment, load_model
from shmcache.registry import segment_name
name = segment_name(sys.argv[2], "orphan", 3)
build_model_segment(load_model(sys.argv[1]), name=name, model_name="orphan", version=3)
print(name, flush=True)
os._exit(0)  # die without unlinking, as a crash would
"""


@pytest.fixture
def instance(tmp_path: Path) -> str:
    return instance_id(tmp_path / "sock")


def make_orphan(tmp_path: Path, instance: str) -> str:
    path = models.save(models.mlp(), tmp_path / "m.onnx")
    out = subprocess.run([sys.executable, "-c", ORPHAN_MAKER, str(path), instance],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_sweep_removes_dead_creators_and_keeps_live_ones(
    tmp_path: Path, instance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    orphan = make_orphan(tmp_path, instance)
    path = models.save(models.mlp(), tmp_path / "live.onnx")
    live = build_model_segment(load_model(path), name=segment_name(instance, "live", 1),
                               model_name="live", version=1)
    try:
        found = {f.name: f for f in registry.list_objects(instance)}
        assert found[orphan].orphan and found[orphan].sealed and found[orphan].version == 3
        assert not found[live.name].orphan

        assert cli_main(["cleanup", "--dry-run"]) == 0
        assert f"would remove {orphan}" in capsys.readouterr().out
        assert (SHM / orphan).exists()

        removed = registry.sweep_orphans(instance)
        assert [f.name for f in removed] == [orphan]
        assert not (SHM / orphan).exists() and (SHM / live.name).exists()
    finally:
        live.unlink()
        registry.remove(orphan)


def test_half_created_object_with_no_header_is_an_orphan(instance: str) -> None:
    # A creator killed between shm_open and ftruncate leaves a zero-byte object.
    name = f"shmcache.{instance}.999999.ghost.v1.abcdef"
    (SHM / name).touch()
    try:
        item = registry.describe(name)
        assert item is not None and item.orphan and item.size == 0
        assert [f.name for f in registry.sweep_orphans(instance)] == [name]
    finally:
        registry.remove(name)


def test_an_adopted_segment_is_not_swept(tmp_path: Path, instance: str) -> None:
    """A restarted daemon adopts a dead creator's sealed segment: the object's creator and
    time become its own, so its next sweep must not take it for an orphan (the adopter
    started long after the object was made)."""
    orphan = make_orphan(tmp_path, instance)
    with open(SHM / orphan, "r+b") as f:  # made an hour ago, as a crashed daemon's would be
        f.seek(120)  # the header's creation time (shmcache.segment draws it)
        f.write(struct.pack("<q", time.time_ns() - 3600 * 10**9))
    adopter = ("import sys; from shmcache import registry; registry.adopt(sys.argv[1]); "
               "print(len(registry.sweep_orphans(sys.argv[2])))")
    try:
        out = subprocess.run([sys.executable, "-c", adopter, orphan, instance], check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True)
        assert out.stdout.strip() == "0"  # swept nothing: the adopter is alive
        assert (SHM / orphan).exists()
    finally:
        registry.remove(orphan)


def test_a_sweep_spares_what_was_adopted_after_it_listed_and_adopt_says_what_vanished(
    tmp_path: Path, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shmcache cleanup`` next to a daemon restarting after a crash: the daemon adopts a
    segment between the sweep's listing and its unlink (the sweep must re-read the creator
    first), or the sweep unlinks one the daemon is about to adopt (adopt must say so in a
    SegmentError the daemon handles, not a FileNotFoundError)."""
    orphan = make_orphan(tmp_path, instance)
    listed = registry.list_objects(instance)
    adopted = False

    def list_then_adopt(inst: str | None = None) -> list[registry.Found]:
        nonlocal adopted
        if not adopted:  # the daemon takes it over right after the sweep listed it
            registry.adopt(orphan)
            adopted = True
        return listed

    try:
        assert [f.name for f in listed if f.orphan] == [orphan]
        monkeypatch.setattr(registry, "list_objects", list_then_adopt)
        assert registry.sweep_orphans(instance) == []
        assert (SHM / orphan).exists()
    finally:
        registry.remove(orphan)
    with pytest.raises(errors.SegmentNotFound, match="vanished"):
        registry.adopt(orphan)


def test_pid_reused_by_a_younger_process_is_not_the_creator() -> None:
    assert registry.process_alive(os.getpid(), None)
    assert not registry.process_alive(os.getpid(), since_ns=1_000_000_000)  # year 1970


def test_inspect_prints_header_and_table(
    tmp_path: Path, instance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = models.save(models.mlp((4, 8, 2)), tmp_path / "m.onnx")
    owned = build_model_segment(load_model(path), name=segment_name(instance, "m", 5),
                                model_name="m", version=5)
    try:
        assert cli_main(["inspect", owned.name, "--verify"]) == 0
        out = capsys.readouterr().out
        assert "model     m  version 5" in out and "digest    verified" in out
        assert "w0" in out and "[4, 8]" in out and "float" in out
    finally:
        owned.unlink()
    assert cli_main(["inspect", owned.name]) == 1
    assert "SegmentNotFound" in capsys.readouterr().err


def test_model_names_are_checked() -> None:
    with pytest.raises(Exception, match="letters, digits"):
        segment_name("00000000", "../etc", 1)
