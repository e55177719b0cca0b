"""The idle heap trimmer's policy, with a recording stand-in for glibc (memory itself is
measured by benchmarks/memory.py, not asserted here)."""

from __future__ import annotations

import platform
from typing import Any

import pytest

from worker import heap


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def mallopt(self, *args: Any) -> int:
        self.calls.append(("mallopt", args))
        return 1

    def malloc_trim(self, *args: Any) -> int:
        self.calls.append(("malloc_trim", args))
        return 1

    def mallinfo2(self) -> heap.MallInfo2:
        return heap.MallInfo2()  # keepcost 0: no top to release


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(heap.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(heap, "load_glibc", lambda: fake)
    return fake


def trims(libc: FakeLibc) -> int:
    return sum(1 for name, _ in libc.calls if name == "malloc_trim")


def test_configures_malloc_and_trims_once_per_idle_period(
    libc: FakeLibc, clock: list[float]
) -> None:
    trimmer = heap.IdleHeapTrimmer(enabled=True)
    assert ("mallopt", (heap.M_ARENA_MAX, 1)) in libc.calls
    assert ("mallopt", (heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)) in libc.calls
    assert ("mallopt", (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD)) in libc.calls

    trimmer.note_activity()
    clock[0] += heap.IDLE_SECONDS / 2
    assert not trimmer.maybe_trim(inflight=0)  # not idle long enough
    clock[0] += heap.IDLE_SECONDS
    assert not trimmer.maybe_trim(inflight=1)  # a request is running
    assert trimmer.maybe_trim(inflight=0) and trims(libc) == 1
    clock[0] += 10 * heap.IDLE_SECONDS
    assert not trimmer.maybe_trim(inflight=0) and trims(libc) == 1  # once per idle period
    trimmer.note_activity()
    clock[0] += heap.IDLE_SECONDS
    assert trimmer.maybe_trim(inflight=0) and trims(libc) == 2


def test_disabled_or_without_glibc_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, libc: FakeLibc, clock: list[float]
) -> None:
    off = heap.IdleHeapTrimmer(enabled=False)
    off.note_activity()
    clock[0] += 10
    assert not off.maybe_trim(0) and libc.calls == []
    monkeypatch.setattr(heap, "load_glibc", lambda: None)
    missing = heap.IdleHeapTrimmer(enabled=True)
    missing.note_activity()
    clock[0] += 10
    assert not missing.enabled and not missing.maybe_trim(0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_glibc_is_found_on_this_host() -> None:
    libc = heap.load_glibc()
    assert libc is not None and libc.malloc_trim(0) in (0, 1)
