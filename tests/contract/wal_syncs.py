"""Watching an SQLite index's WAL syncs: which file, and whether the write lock was free."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from sqlalchemy import Engine


def record_wal_syncs(monkeypatch: pytest.MonkeyPatch, database: Path) -> list[tuple[str, bool]]:
    """From now on, each ``os.fdatasync`` appends (path synced, write lock free then)."""
    synced: list[tuple[str, bool]] = []
    real_fdatasync = os.fdatasync

    def lock_is_free() -> bool:
        fd = os.open(f"{database}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing the descriptor drops a lock taken here
        return True

    def fdatasync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), lock_is_free()))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return synced


def pooled_synchronous_settings(engine: Engine) -> set[int]:
    """PRAGMA synchronous of every connection the pool hands out (and one more)."""
    held = [engine.connect() for _ in range(engine.pool.checkedin() + 1)]  # type: ignore[attr-defined]
    try:
        return {int(c.exec_driver_sql("PRAGMA synchronous").scalar() or 0) for c in held}
    finally:
        for c in held:
            c.close()
