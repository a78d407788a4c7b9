"""Group commit for an SQLite file's WAL, across every process writing it.

Writers commit with ``synchronous=NORMAL`` under SQLite's one write lock and make
the commit durable afterwards (``WalSync.make_durable``): WAL frames are appended
in commit order, so one fdatasync of the WAL makes a commit, and every one before
it, durable: exactly the sync FULL adds to each commit
(sqlite.org/pragma.html#pragma_synchronous).

That one sync can serve several writers. Under ``vna run`` three receiver
processes claim, and the archive's relay and indexer write, each followed by a
sync: at four associations 1.35 WAL syncs an instance, each a cache flush of the
disk, on every acknowledgement's path. So each commit takes a ticket (a counter
shared by the processes, in ``<database>.sync``, taken under the write lock
right after COMMIT), and a writer whose ticket an fdatasync started since has
covered returns without one of its own: while one process syncs, the others'
commits queue and the next sync covers them all.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator

from sqlalchemy import Engine

from vna.durable import sync_path

_COUNTERS = struct.Struct("=QQ")
"""In ``<database>.sync``: commits ticketed, commits known synced."""


class _FileLock:
    """A lock across this process's threads and other processes (flock)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._thread = threading.Lock()  # flock() does not exclude this process's threads

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)


class WalSync:
    """Makes an SQLite file's committed transactions durable after the fact.

    Two locks, each a file beside the database: the counters' (``.sync``, held
    for the few microseconds of reading or writing them, so that no process ever
    reads one half written) and the syncs' (``.sync-lock``, held through an
    fdatasync, so that a writer arriving meanwhile waits for it and then finds
    whether it was covered)."""

    def __init__(self, engine: Engine) -> None:
        database = (engine.url.database or "") if engine.dialect.name == "sqlite" else ""
        self.database = database if database != ":memory:" else ""
        """The database file; '' when there is none to sync (memory, PostgreSQL)."""
        self._directory_synced = False
        self._counters: mmap.mmap | None = None
        self._counter_lock: _FileLock | None = None
        self._sync_lock: _FileLock | None = None
        if not self.database:
            return
        fds: list[int] = []
        try:
            fds.append(os.open(self.database + ".sync", os.O_RDWR | os.O_CREAT, 0o600))
            if os.fstat(fds[0]).st_size < _COUNTERS.size:
                os.ftruncate(fds[0], _COUNTERS.size)  # zeros: nothing ticketed yet
            fds.append(os.open(self.database + ".sync-lock", os.O_RDWR | os.O_CREAT, 0o600))
            self._counters = mmap.mmap(fds[0], _COUNTERS.size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._counter_lock, self._sync_lock = _FileLock(fds[0]), _FileLock(fds[1])

    def ticket(self) -> int:
        """Call under the write lock, once COMMIT has returned (its WAL frames are
        written then): the commit's ticket for ``make_durable``."""
        if self._counter_lock is None:
            return 0
        with self._counter_lock.held():
            ticketed, synced = self._read()
            self._write(ticketed + 1, synced)
        return ticketed + 1

    def make_durable(self, ticket: int | None = None) -> None:
        """Return once the commit holding ``ticket`` is durable; with no ticket (a
        commit the caller saw rather than made), once every commit so far is.
        Raises OSError when that cannot be known."""
        if self._counter_lock is None or self._sync_lock is None:
            return  # in memory: nothing is durable, nothing to wait for
        if ticket is not None and self._covers(ticket):
            return
        with self._sync_lock.held():
            if ticket is not None and self._covers(ticket):
                return  # the sync another writer made meanwhile covered it
            with self._counter_lock.held():
                covered = self._read()[0]  # every commit ticketed by now is in the WAL
            self._sync()
            with self._counter_lock.held():
                ticketed, synced = self._read()
                self._write(ticketed, max(synced, covered))

    def close(self) -> None:
        counters, self._counters = self._counters, None
        if counters is not None:
            counters.close()
        for lock in (self._counter_lock, self._sync_lock):
            if lock is not None:
                os.close(lock.fd)
        self._counter_lock = self._sync_lock = None

    def _covers(self, ticket: int) -> bool:
        assert self._counter_lock is not None
        with self._counter_lock.held():
            return self._read()[1] >= ticket

    def _read(self) -> tuple[int, int]:
        assert self._counters is not None
        ticketed, synced = _COUNTERS.unpack_from(self._counters)
        return int(ticketed), int(synced)

    def _write(self, ticketed: int, synced: int) -> None:
        assert self._counters is not None
        _COUNTERS.pack_into(self._counters, 0, ticketed, synced)

    def _sync(self) -> None:
        try:
            sync_path(self.database + "-wal", data_only=True)
        except FileNotFoundError:
            # Only after the last connection closed, having checkpointed it into
            # the database: sync that instead.
            sync_path(self.database, data_only=True)
        if not self._directory_synced:  # the WAL's own name, once a process
            sync_path(os.path.dirname(os.path.abspath(self.database)))
            self._directory_synced = True
