"""supervisor.memlock: a real segment locked and unlocked; a too-low RLIMIT_MEMLOCK explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from supervisor.memlock import MemoryLockError, already_locked, lock_segment, unlock

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16 * 4096


@pytest.fixture
def segment(shm_name: str) -> Iterator[str]:
    """A 64 KiB shmcache-named object in /dev/shm, unlinked at teardown."""
    shm = posix_ipc.SharedMemory("/" + shm_name, posix_ipc.O_CREX, mode=0o600, size=SIZE)
    shm.close_fd()
    try:
        yield shm_name
    finally:
        posix_ipc.unlink_shared_memory("/" + shm_name)


def test_lock_by_name_counts_against_vmlck_until_unlocked(segment: str) -> None:
    before = already_locked()
    locked = lock_segment(segment)
    try:
        assert locked.locked and locked.size == SIZE
        assert already_locked() == before + SIZE
    finally:
        unlock(locked)
    assert not locked.locked and already_locked() == before
    locked.unlock()  # idempotent


def test_lock_by_fd_and_path_with_explicit_size(segment: str) -> None:
    before = already_locked()
    fd = os.open(f"/dev/shm/{segment}", os.O_RDONLY)
    try:
        with lock_segment(fd, 4096) as locked:
            assert already_locked() == before + 4096
    finally:
        os.close(fd)
    assert not locked.locked
    with lock_segment(Path("/dev/shm") / segment) as locked:
        assert locked.size == SIZE
    assert already_locked() == before


def test_refuses_more_than_the_segment_holds_and_missing_segments(segment: str) -> None:
    with pytest.raises(MemoryLockError, match=f"holds {SIZE} bytes"):
        lock_segment(segment, SIZE + 1)
    with pytest.raises(MemoryLockError, match="cannot open"):
        lock_segment(segment + ".gone")


def test_too_low_rlimit_memlock_names_the_limit_and_systemd_setting(segment: str) -> None:
    """In a child: open the segment, lower RLIMIT_MEMLOCK to one page and (as root) drop to
    nobody, because CAP_IPC_LOCK would ignore the limit."""
    script = textwrap.dedent(f"""
        import json, os, resource
        from supervisor.memlock import MemoryLockError, lock_segment
        fd = os.open("/dev/shm/{segment}", os.O_RDONLY)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (4096, 4096))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        try:
            lock_segment(fd)
        except MemoryLockError as exc:
            print(json.dumps({{"error": str(exc)}}))
        else:
            print(json.dumps({{"error": None}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    message = json.loads(done.stdout)["error"]
    assert message is not None, "mlock of 64 KiB succeeded under a 4 KiB limit"
    assert f"cannot lock {SIZE} bytes" in message
    assert "RLIMIT_MEMLOCK is soft 4096 bytes, hard 4096 bytes" in message
    assert "LimitMEMLOCK=" in message and "ulimit -l" in message
