"""The version table: the flip, and the versions coming back, seen by a read-only reader."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator

import pytest

from shmcache.errors import SegmentError
from shmcache.state import MAX_COMING_BACK, ConnectionBoard, VersionTable


@pytest.fixture
def table() -> Iterator[VersionTable]:
    t = VersionTable.create(f"shmcache-test-state-{uuid.uuid4().hex[:8]}", ["a", "b"])
    try:
        yield t
    finally:
        t.unlink()


def test_a_reader_sees_flips_and_versions_coming_back_per_slot(table: VersionTable) -> None:
    reader = VersionTable.attach(table.name)
    assert reader.index == {"a": 0, "b": 1}
    table.flip(1, 5)
    table.set_coming_back(1, [3, 4])
    assert (reader.current(0), reader.current(1), reader.flips(1)) == (0, 5, 1)
    assert reader.coming_back(1) == [3, 4] and reader.coming_back(0) == []
    table.set_coming_back(1, [4])
    assert reader.coming_back(1) == [4]
    table.set_coming_back(1, list(range(1, 20)))  # a hint: the first seven
    assert reader.coming_back(1) == list(range(1, MAX_COMING_BACK + 1))
    assert reader.current(1) == 5  # the list never spills into a neighbour
    with pytest.raises(SegmentError):
        reader.set_coming_back(0, [1])
    with pytest.raises(SegmentError):
        reader.flip(0, 2)


def test_the_table_is_private_to_its_user(table: VersionTable) -> None:
    mode = stat.S_IMODE(os.stat(f"/dev/shm/{table.name}").st_mode)
    assert mode == 0o600


def test_the_board_says_the_fewest_connections_any_other_worker_holds() -> None:
    board = ConnectionBoard.create(f"shmcache-test-board-{uuid.uuid4().hex[:8]}")
    try:
        worker = ConnectionBoard.attach(board.name)  # as a worker maps it: writable
        assert worker.fewest_elsewhere(0) is None  # nobody else accepts
        worker.post(0, 5)
        board.post(3, 2)
        board.post(7, 0)
        assert worker.fewest_elsewhere(0) == 0 and board.fewest_elsewhere(7) == 2
        board.post(7, None)  # a standby, or gone
        assert worker.fewest_elsewhere(0) == 2 and worker.fewest_elsewhere(3) == 5
        assert stat.S_IMODE(os.stat(f"/dev/shm/{board.name}").st_mode) == 0o600
    finally:
        board.unlink()
