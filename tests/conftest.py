"""Suite-wide fixtures, and the check that the run left nothing of ours in /dev/shm."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
_before: set[str] = set()


def ours_in_shm() -> set[str]:
    """Segments, semaphores (sem.*) and locks of this project currently in /dev/shm."""
    return {p.name for p in SHM.iterdir() if "shmcache" in p.name}


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(ours_in_shm())


def leaked_by_this_run(names: set[str]) -> list[str]:
    """New objects whose creator is this process or dead: a daemon another run (or a person)
    started meanwhile is alive and not ours to judge or remove."""
    from shmcache import registry

    leaked = []
    for name in sorted(names):
        item = registry.describe(name)
        if item is None:
            continue
        if item.orphan or item.pid == os.getpid() or item.pid is None:
            leaked.append(name)
    return leaked


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = leaked_by_this_run(ours_in_shm() - _before)
    if leaked:
        for name in leaked:  # remove them so one leak does not poison the next run
            try:
                (SHM / name).unlink()
            except FileNotFoundError:
                pass
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"LEAK: the test run left {len(leaked)} object(s) in /dev/shm: {leaked}"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh shmcache-style name; whatever is left under it is removed at teardown."""
    name = f"shmcache.00000000.{os.getpid()}.t.v1.{secrets.token_hex(3)}"
    yield name
    try:
        (SHM / name).unlink()
    except FileNotFoundError:
        pass
