"""Huge pages for ONNX Runtime's transient pre-packs, and for nothing else.

A worker preparing a pre-packed version re-packs every weight before it adopts the stored blob
(benchmarks/NOTES-prepack.md, answer 4): for the 256 MiB MLP, four fresh 64 MiB buffers, each
faulted in 4 KiB at a time, zeroed, packed, hashed, compared, unmapped. With transparent huge
pages on those buffers the same session is created in ~0.25 s instead of ~0.41 s (6 creations
each, fresh process, idle host; 67 k page faults instead of 526 k), and a publish's prepare
under benchmarks/swap.py's load drops from p50 0.88-1.01 s / max 1.01-1.30 s to
0.64-0.82 s / 0.81-1.12 s (one publish of 140 over 1 s).

Getting huge pages there and only there takes three steps, because the kernel's default mode is
``madvise`` (only regions advised MADV_HUGEPAGE get them) and ORT's buffers come from malloc:

1. ``glibc.malloc.hugetlb=1`` makes glibc advise every region it maps: large blocks and the
   heap. It is read when a process starts, so ``shmcache serve`` re-executes itself once with
   it (``reexec_with_tunable``), and with any other start-only tunable the daemon wants
   (worker.heap's), so that there is one re-exec.
2. Huge pages on the heap would round every worker's idle heap up to 2 MiB pages (measured:
   +1.6 MiB per empty worker, +-1.2 MiB of noise, against a per-worker budget of 0.28 MiB on a
   14 MiB model), so the daemon turns THP off for itself at once (``prctl(PR_SET_THP_DISABLE)``,
   inherited by the workers it forks): advised or not, nothing gets huge pages.
3. A worker turns THP back on only while it creates a session for a publish
   (``transient_huge_pages``); the heap is warm by then, so what faults in is the packs. Not at
   boot: a first session grows the heap with ORT's own structures (+2.2 MiB per Conv worker
   measured when boot was included).

The huge pages are a no-op where they cannot work (not glibc >= 2.35, THP ``never`` or
``always``, no /sys) or when the serve option ``huge_pages`` is off (``--no-huge-pages``); the
re-exec may still happen for the other tunables, and then leaves THP as it was.
One more cost is paid elsewhere: under the tunable glibc trims the heap's top only in 2 MiB
steps, which worker.heap.trim_heap makes up for; with it, benchmarks/memory.py measures the
same per-worker memory with huge pages as without (Conv 1.3-1.4% of the model per worker).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from shmcache.libc import libc

TUNABLE = "glibc.malloc.hugetlb=1"
TUNABLES_ENV = "GLIBC_TUNABLES"
REEXEC_MARK = "SHMCACHE_REEXECUTED"  # set for the re-executed image only, which removes it
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
MIN_GLIBC = (2, 35)  # first glibc with the hugetlb tunable


def thp_mode(path: str = THP_MODE_PATH) -> str:
    """The kernel's THP mode (``always``, ``madvise``, ``never``), or "" when unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def has_tunable(environ: Mapping[str, str]) -> bool:
    return TUNABLE in environ.get(TUNABLES_ENV, "").split(":")


def environ_with_tunable(environ: Mapping[str, str], huge: bool = True,
                         extra: Sequence[str] = ()) -> dict[str, str] | None:
    """The environment to re-execute with, or None when that would change nothing: the
    hugetlb tunable if ``huge`` and it can help here, and the ``extra`` glibc tunables (other
    modules' malloc settings that, like this one, glibc reads only at start), each added to
    the user's own unless the user set it already."""
    version = glibc_version()
    if version is None:  # not glibc: no tunables at all
        return None
    wanted = list(extra)
    if huge and version >= MIN_GLIBC and thp_mode() == "madvise":
        wanted.append(TUNABLE)
    # A tunable the user set, to any value, is theirs.
    have = {t.split("=", 1)[0] for t in environ.get(TUNABLES_ENV, "").split(":")}
    missing = [t for t in wanted if t.split("=", 1)[0] not in have]
    if not missing:
        return None
    env = dict(environ)
    env[TUNABLES_ENV] = ":".join(t for t in (env.get(TUNABLES_ENV), *missing) if t)
    return env


def small_pages_before_exec(env: Mapping[str, str], huge: bool) -> bool:
    """Whether THP goes off before the exec: only where the new image will keep small pages
    (keep_small_pages), and then before, not after: the flag survives execve, and the new
    interpreter's first heap pages must not be huge (they would be, advised and faulted at
    start). A hugetlb tunable the user set with huge pages off, or under another THP mode,
    leaves THP as it was."""
    return huge and has_tunable(env) and thp_mode() == "madvise"


def reexec_with_tunable(huge: bool = True, extra: Sequence[str] = ()) -> None:
    """Replace this process by itself started with the tunables (same pid, argv, descriptors
    that are inheritable), unless it has them already or they would not help. Once only: the
    new image finds REEXEC_MARK and does not try again, even where the loader dropped the
    tunables (setuid, or an interpreter with file capabilities, drops GLIBC_TUNABLES in glibc
    2.26-2.38) and they would look missing for ever."""
    if os.environ.pop(REEXEC_MARK, None) is not None:
        return
    env = environ_with_tunable(os.environ, huge, extra)
    if env is None:
        return
    env[REEXEC_MARK] = "1"
    if small_pages_before_exec(env, huge):
        libc().prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def keep_small_pages() -> bool:
    """In a process started with the tunable: no huge pages unless asked (step 2). Returns
    whether transient_huge_pages() will do anything here and in forked children. Already so
    after reexec_with_tunable(); needed when the tunable came with the environment."""
    if not has_tunable(os.environ) or thp_mode() != "madvise":
        return False
    return libc().prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0


def small_pages_kept() -> bool:
    """True in a process (or a child of one) where keep_small_pages() took effect."""
    return has_tunable(os.environ) and libc().prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1


_lock = threading.Lock()
_holders = 0
_active: bool | None = None  # whether windows toggle anything here; decided at the first one


@contextmanager
def transient_huge_pages() -> Iterator[bool]:
    """Huge pages for what faults in inside the block (step 3); process-wide, so nested and
    concurrent blocks (two models prepared at once) share one window. Yields whether the
    window does anything in this process."""
    global _holders, _active
    with _lock:
        if _active is None:
            _active = small_pages_kept()
        if _active:
            _holders += 1
            if _holders == 1:
                libc().prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
    try:
        yield _active
    finally:
        if _active:
            with _lock:
                _holders -= 1
                if _holders == 0:
                    libc().prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
