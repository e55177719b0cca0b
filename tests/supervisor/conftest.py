"""Every daemon a test starts is gone when the test ends, whatever happened in between."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shmcache import registry
from tests.supervisor import daemon as harness


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while harness.STARTED:
        d = harness.STARTED.pop()
        if d.proc.poll() is None:
            d.proc.kill()  # the test failed before stopping it; its workers die with it
            d.proc.wait(timeout=30)
        if not d.log.closed:
            d.log.close()
        registry.sweep_orphans(d.instance)
