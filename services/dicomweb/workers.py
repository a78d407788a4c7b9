"""HTTP from several processes: one listening socket, a uvicorn server in each worker.

In one process, STOW-RS is bound to one GIL: parsing multipart bodies, hashing
and framing are Python. ``vna run`` (and ``vna dicomweb``) therefore bind the
HTTP port once and hand the listening socket to ``VNA_HTTP_WORKERS`` worker
processes (``vna http-worker``), each serving the same application over its
own ``Deps``. A STOW-RS in a worker goes through ``store_instance`` into the
shared index and outbox, exactly as a DIMSE receiver's C-STORE does; the main
process relays the outbox and indexes.

Each worker accepts in a thread with a blocking ``accept``: Linux hands each
connection to the longest waiting one, so connections go round the workers.
(An event loop accepting from a shared socket takes every pending connection
at once: four clients connecting together would all land on one worker.)

Each worker has a channel to the archive (a Unix socket pair), one byte a
message, worker -> archive: ``r`` serving, ``s`` something was stored (the
archive wakes its outbox relay at once rather than at its next poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

log = logging.getLogger("vna.dicomweb.workers")

LISTEN_FD_ENV = "VNA_HTTP_LISTEN_FD"
"""Tells an ``http-worker`` which inherited descriptor is the listening socket."""
CHANNEL_FD_ENV = "VNA_HTTP_CHANNEL_FD"
"""... and which one is its channel to the archive."""


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    ready: threading.Event = field(default_factory=threading.Event)


class HttpWorkers:
    """The archive's side: binds the port, starts, watches and stops the workers."""

    def __init__(self, host: str, port: int, count: int,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.count = count
        self.on_stored = on_stored
        self._listener = socket.create_server((host, port), backlog=1024)
        self._workers: list[_Worker] = []
        self._closed = False

    def start(self) -> None:
        self._workers = [self._spawn() for _ in range(self.count)]

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker said it is serving."""
        return all(w.ready.wait(timeout) for w in self._workers)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def replace_exited(self) -> None:
        """A worker that died (OOM-killed, a crash) is replaced; meanwhile the others
        accept its share of connections."""
        for i, worker in enumerate(self._workers):
            if worker.proc.poll() is not None and not self._closed:
                log.error("an HTTP worker exited; starting another",
                          extra={"pid": worker.proc.pid, "returncode": worker.proc.returncode})
                with contextlib.suppress(OSError):
                    worker.channel.close()
                self._workers[i] = self._spawn()

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, let the workers finish their requests, then stop them."""
        self._closed = True
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=5)
            with contextlib.suppress(OSError):
                worker.channel.close()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fd, channel_fd = self._listener.fileno(), theirs.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vna", "http-worker"], pass_fds=[listen_fd, channel_fd],
            env={**os.environ, LISTEN_FD_ENV: str(listen_fd), CHANNEL_FD_ENV: str(channel_fd)})
        theirs.close()  # the worker holds it now
        worker = _Worker(proc, ours)
        threading.Thread(target=self._listen, args=(worker,), daemon=True,
                         name="http-worker-reports").start()
        return worker

    def _listen(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.channel.recv(256)
            except OSError:
                return
            if not data:
                return  # the worker is gone
            if b"r" in data:
                worker.ready.set()
            if b"s" in data and self.on_stored is not None:
                try:
                    self.on_stored()
                except Exception:
                    log.exception("on_stored hook failed")


# ------------------------------------------------------------------ in a worker
class SharedSocketServer(uvicorn.Server):
    """uvicorn over connections accepted from a listening socket other processes share."""

    def __init__(self, config: uvicorn.Config, listener: socket.socket,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.listener = listener
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # No asyncio server of its own: connections arrive from the accept thread.
        await super().startup(sockets=[])
        if self.should_exit:
            return
        loop = asyncio.get_running_loop()
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, _loop=loop)
            return protocol

        def attach(conn: socket.socket) -> None:
            if self.should_exit:
                conn.close()
                return
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(create_protocol, conn))
            task.add_done_callback(_log_failure)

        def accept_forever() -> None:
            while not self.should_exit:
                try:
                    conn, _ = self.listener.accept()
                except OSError as exc:
                    if self.should_exit:
                        return
                    log.warning("accept failed: %s", exc)
                    continue
                try:
                    loop.call_soon_threadsafe(attach, conn)
                except RuntimeError:  # the loop is closed: we are stopping
                    conn.close()
                    return

        threading.Thread(target=accept_forever, name="http-accept", daemon=True).start()
        if self.on_started is not None:
            self.on_started()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a connection could not be set up: %s", task.exception())


def report(channel: socket.socket, message: bytes) -> None:
    """Tell the archive something (``r`` serving, ``s`` stored); never raises."""
    with contextlib.suppress(OSError):
        channel.sendall(message)
