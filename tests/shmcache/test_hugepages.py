"""Huge pages for transient re-packs only: the tunable, the re-exec and the THP window, in
real processes (prctl and execve are per process; nothing here touches the test runner's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmcache import hugepages
from worker import heap

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = hugepages.environ_with_tunable({}) is not None
needs_thp_madvise = pytest.mark.skipif(
    not SUPPORTED, reason="needs glibc >= 2.35 and THP in madvise mode")


def run_python(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_thp_mode_reads_the_bracketed_choice(tmp_path: Path) -> None:
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(f)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


def test_tunable_is_added_to_the_users_tunables_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    env = hugepages.environ_with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}", "X": "1"}
    assert hugepages.environ_with_tunable(env) is None  # already there: no second exec
    assert hugepages.environ_with_tunable({})["GLIBC_TUNABLES"] == hugepages.TUNABLE  # type: ignore[index]


def test_other_tunables_are_added_whatever_the_thp_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "always")  # hugetlb cannot help here
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    tcache = "glibc.malloc.tcache_count=0"
    env = hugepages.environ_with_tunable({}, extra=[tcache])
    assert env == {"GLIBC_TUNABLES": tcache}
    assert hugepages.environ_with_tunable(env, extra=[tcache]) is None  # no second exec
    assert hugepages.environ_with_tunable({}, huge=False) is None


def test_a_tunable_the_user_set_is_left_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    mine = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=0"}
    assert hugepages.environ_with_tunable(mine, extra=["glibc.malloc.tcache_count=0"]) is None
    env = hugepages.environ_with_tunable({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},
                                         extra=["glibc.malloc.tcache_count=0"])
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.tcache_count=7:{hugepages.TUNABLE}"}


@pytest.mark.parametrize("huge, mode, small", [(True, "madvise", True), (False, "madvise", False),
                                               (True, "always", False), (True, "never", False)])
def test_thp_goes_off_before_the_exec_only_where_huge_pages_will_be_kept_small(
    monkeypatch: pytest.MonkeyPatch, huge: bool, mode: str, small: bool
) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: mode)
    env = {"GLIBC_TUNABLES": f"{hugepages.TUNABLE}:glibc.malloc.tcache_count=0"}
    assert hugepages.small_pages_before_exec(env, huge) is small
    assert hugepages.small_pages_before_exec({"GLIBC_TUNABLES": ""}, huge) is False


def test_the_reexecuted_image_does_not_exec_again() -> None:
    """Where the loader drops GLIBC_TUNABLES (setuid, file capabilities) the tunables would look
    missing after every exec: the mark stops a second one, and is not passed on."""
    out = run_python("""
        import json, os
        from shmcache import hugepages
        hugepages.reexec_with_tunable(extra=["glibc.malloc.tcache_count=0"])
        print(json.dumps({"mark": hugepages.REEXEC_MARK in os.environ,
                          "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
    """, env={"GLIBC_TUNABLES": "", hugepages.REEXEC_MARK: "1"})
    assert out == {"mark": False, "tunables": ""}


def test_no_tunables_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: None)
    assert hugepages.environ_with_tunable({}, extra=["glibc.malloc.tcache_count=0"]) is None


@pytest.mark.parametrize("mode, version", [("always", (2, 36)), ("never", (2, 36)),
                                           ("", (2, 36)), ("madvise", (2, 34)),
                                           ("madvise", None)])
def test_no_reexec_where_the_tunable_cannot_help(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                 version: tuple[int, int] | None) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda: mode)
    monkeypatch.setattr(hugepages, "glibc_version", lambda: version)
    assert hugepages.environ_with_tunable({}) is None


@needs_thp_madvise
def test_reexec_keeps_the_pid_and_starts_with_small_pages() -> None:
    out = run_python("""
        import json, os, sys
        from shmcache import hugepages
        if "--again" not in sys.argv:
            os.environ["FIRST_PID"] = str(os.getpid())
            sys.orig_argv.append("--again")
            hugepages.reexec_with_tunable()
            raise SystemExit("no exec")
        status = dict(l.split(":", 1) for l in open("/proc/self/status"))
        print(json.dumps({"first": int(os.environ["FIRST_PID"]), "now": os.getpid(),
                          "tunables": os.environ["GLIBC_TUNABLES"],
                          "thp": status["THP_enabled"].strip(),
                          "kept": hugepages.small_pages_kept()}))
    """, env={"GLIBC_TUNABLES": ""})
    assert out["first"] == out["now"]
    assert out["tunables"] == hugepages.TUNABLE
    assert out["thp"] == "0"  # off from the first instruction of the new image
    assert out["kept"] is True


@needs_thp_madvise
def test_the_window_opens_once_for_concurrent_holders_and_closes_after_the_last() -> None:
    out = run_python("""
        import json
        from shmcache import hugepages
        def thp():
            return next(l.split()[1] for l in open("/proc/self/status")
                        if l.startswith("THP_enabled"))
        seen = [hugepages.keep_small_pages(), thp()]
        with hugepages.transient_huge_pages() as first:
            seen += [first, thp()]
            with hugepages.transient_huge_pages():
                seen.append(thp())
            seen.append(thp())  # the outer holder still has it open
        seen.append(thp())
        print(json.dumps(seen))
    """, env={"GLIBC_TUNABLES": hugepages.TUNABLE})
    assert out == [True, "0", True, "1", "1", "1", "0"]


def test_the_window_does_nothing_where_small_pages_were_not_kept() -> None:
    out = run_python("""
        import json
        from shmcache import hugepages
        with hugepages.transient_huge_pages() as active:
            thp = next(l.split()[1] for l in open("/proc/self/status")
                       if l.startswith("THP_enabled"))
        print(json.dumps([active, thp]))
    """)
    assert out == [False, "1"]


# A fresh interpreter whose glibc is set as a worker's (worker.heap), with rss() = its anonymous
# resident bytes: what each heap probe below starts from.
HEAP_PROBE = f"""
import ctypes, json
from worker.heap import load_glibc, trim_heap
libc = load_glibc()
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.mallopt({heap.M_MMAP_THRESHOLD}, {heap.MMAP_THRESHOLD})
libc.mallopt({heap.M_TRIM_THRESHOLD}, {heap.TRIM_THRESHOLD})
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith("RssAnon")) * 1024
"""


@needs_thp_madvise
def test_trim_heap_returns_the_top_a_hugetlb_glibc_keeps() -> None:
    # Blocks on the heap's top, touched and freed: under the tunable malloc_trim(0) trims in
    # 2 MiB steps, so how much of a block stays resident depends on where it ended (0.1-2 MiB
    # in 7 of 8 runs; none when the blocks came from a free chunk inside the heap instead);
    # trim_heap() must leave none of it, whatever the size.
    out = run_python(HEAP_PROBE + textwrap.dedent("""
        trim_heap(libc)
        rounds = []
        # The first round is a rehearsal: ctypes' and Python's first calls leave ~8 pages of
        # their own (1 run in 20), which are not the heap's top.
        for kib in (640, 640, 1024, 1536, 1792, 2560, 3584):
            base = rss()
            block = libc.malloc(kib << 10)
            libc.memset(block, 1, kib << 10)
            libc.free(block)
            libc.malloc_trim(0)
            kept = rss() - base
            trim_heap(libc)
            rounds.append([kept, rss() - base])
        print(json.dumps(rounds))
    """), env={"GLIBC_TUNABLES": hugepages.TUNABLE})
    assert all(left <= 4 * heap.PAGE for _, left in out[1:]), out


@needs_thp_madvise
def test_trim_heap_finds_the_top_behind_many_larger_free_chunks() -> None:
    # After a Conv model's runs the heap holds dozens of free chunks larger than its top, and
    # malloc hands those out first (best fit): trim_heap must get past all of them. The top
    # is touched over more than 2 MiB, so whatever malloc_trim(0) keeps of it is resident:
    # where a top ends within 2 MiB decides how much, so four sizes. Measured, 25 runs each:
    # at most 42 pages left per round with trim_heap (a few pages of Python's own, sometimes
    # ~30), at least 377 in the worst round with malloc_trim(0) alone.
    out = run_python(HEAP_PROBE + textwrap.dedent(f"""
        libc.prctl({hugepages.PR_SET_THP_DISABLE}, 1, 0, 0, 0)  # as in the daemon
        pins, rounds = [], []
        for size in (7 << 19, 5 << 20, 9 << 19, 13 << 19):
            big = []
            for _ in range(60):  # 2.5 MiB chunks kept apart by small live ones
                big.append(libc.malloc(5 << 19))
                pins.append(libc.malloc(256 << 10))  # too big to come from a free chunk elsewhere
            trim_heap(libc)
            base = rss()  # the chunks' headers are resident from here on
            top = libc.malloc(size)
            libc.memset(top, 1, size)
            for block in [top, *big]:
                libc.free(block)
            trim_heap(libc)
            rounds.append(rss() - base)
        print(json.dumps(rounds))
    """), env={"GLIBC_TUNABLES": hugepages.TUNABLE})
    assert all(left <= 128 * heap.PAGE for left in out), out
