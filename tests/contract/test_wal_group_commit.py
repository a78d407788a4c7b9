"""Group commit of an SQLite WAL across writers (``vna.adapters.index.wal``).

Two ``WalSync`` on one database stand for two processes: each has its own
descriptors and mapping of the shared counters, and flock() excludes separate
descriptors of a file as it excludes processes."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from tests.contract.wal_syncs import record_wal_syncs
from vna.adapters.index.wal import WalSync


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v INTEGER)")
    open(f"{path}.lock", "w").close()  # record_wal_syncs looks at the write lock
    yield path


def _commit(database: Path, value: int) -> None:
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("INSERT INTO t VALUES (?)", (value,))
    finally:
        conn.close()


def _writers(database: Path) -> tuple[WalSync, WalSync]:
    engine = create_engine(f"sqlite:///{database}")
    return WalSync(engine), WalSync(engine)


def test_one_sync_covers_every_commit_ticketed_before_it(
        database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _writers(database)
    try:
        # Keep the connections' WAL open: the last close checkpoints it away.
        keeper = sqlite3.connect(database)
        keeper.execute("SELECT 1").fetchall()
        _commit(database, 1)
        ticket_1 = first.ticket()
        _commit(database, 2)
        ticket_2 = second.ticket()
        assert ticket_2 == ticket_1 + 1  # one counter for both "processes"
        synced = record_wal_syncs(monkeypatch, database)
        first.make_durable(ticket_1)
        wal = f"{database}-wal"
        assert [path for path, _ in synced] == [wal]
        second.make_durable(ticket_2)  # covered by the first writer's sync
        assert [path for path, _ in synced] == [wal]
        # A commit after that sync needs one of its own.
        _commit(database, 3)
        ticket_3 = second.ticket()
        second.make_durable(ticket_3)
        assert [path for path, _ in synced] == [wal, wal]
        # Without a ticket (a commit seen, not made) it always syncs.
        first.make_durable()
        assert len(synced) == 3
        keeper.close()
    finally:
        first.close()
        second.close()


def test_a_failed_sync_covers_nothing(database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _writers(database)
    try:
        _commit(database, 1)
        ticket_1 = first.ticket()
        _commit(database, 2)
        ticket_2 = second.ticket()

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(OSError):
            first.make_durable(ticket_1)
        monkeypatch.undo()
        synced = record_wal_syncs(monkeypatch, database)
        second.make_durable(ticket_2)  # not taken as covered: it syncs itself
        assert len(synced) == 1
    finally:
        first.close()
        second.close()


def test_memory_and_postgresql_have_nothing_to_sync() -> None:
    wal = WalSync(create_engine("sqlite://"))
    assert wal.ticket() == 0
    wal.make_durable(0)
    wal.make_durable()
    wal.close()
