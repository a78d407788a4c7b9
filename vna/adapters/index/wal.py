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

import fcntl
import mmap
import os
import struct
import threading

from sqlalchemy import Engine

from vna.durable import sync_path

_COUNTERS = struct.Struct("=QQ")
"""In ``<database>.sync``: commits ticketed, commits known synced."""


class FileLock:
    """A lock across this process's threads and, given a file, other processes
    (flock() on it; it does not exclude this process's own threads)."""

    def __init__(self, path: str | None) -> None:
        self._thread = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None

    def acquire(self) -> bool:
        self._thread.acquire()
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._thread.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        """Let go of the file (its other users keep theirs)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


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
        self._counter_lock: FileLock | None = None
        self._sync_lock: FileLock | None = None
        if not self.database:
            return
        counter_lock = FileLock(self.database + ".sync")
        try:
            assert counter_lock.fd is not None
            if os.fstat(counter_lock.fd).st_size < _COUNTERS.size:
                os.ftruncate(counter_lock.fd, _COUNTERS.size)  # zeros: nothing ticketed yet
            self._counters = mmap.mmap(counter_lock.fd, _COUNTERS.size)
            self._sync_lock = FileLock(self.database + ".sync-lock")
        except BaseException:
            counter_lock.close()
            raise
        self._counter_lock = counter_lock

    def ticket(self) -> int:
        """Call under the write lock, once COMMIT has returned (its WAL frames are
        written then): the commit's ticket for ``make_durable``."""
        if self._counter_lock is None:
            return 0
        with self._counter_lock:
            ticketed, synced = self._read()
            self._write(ticketed + 1, synced)
        return ticketed + 1

    def make_durable(self, ticket: int | None = None) -> None:
        """Return once the commit holding ``ticket`` is durable; with no ticket (a
        commit the caller saw rather than made), once every commit so far is.
        Raises OSError when that cannot be known."""
        if self._counter_lock is None or self._sync_lock is None:
            return  # in memory: nothing is durable, nothing to wait for
        if ticket is not None and self._read_locked()[1] >= ticket:
            return
        with self._sync_lock:
            covered, synced = self._read_locked()  # every commit ticketed by now is in the WAL
            if ticket is not None and synced >= ticket:
                return  # the sync another writer made meanwhile covered it
            self._sync()
            with self._counter_lock:
                ticketed, synced = self._read()
                self._write(ticketed, max(synced, covered))

    def close(self) -> None:
        counters, self._counters = self._counters, None
        if counters is not None:
            counters.close()
        for lock in (self._counter_lock, self._sync_lock):
            if lock is not None:
                lock.close()
        self._counter_lock = self._sync_lock = None

    def _read_locked(self) -> tuple[int, int]:
        assert self._counter_lock is not None
        with self._counter_lock:
            return self._read()

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
