"""HTTP from several processes: the archive accepts, its workers serve.

In one process, STOW-RS is bound to one GIL: parsing multipart bodies, hashing
and framing are Python. ``vna run`` (and ``vna dicomweb``) therefore bind the
HTTP port once and run ``VNA_HTTP_WORKERS`` worker processes (``vna
http-worker``), each serving the same application over its own ``Deps``. A
STOW-RS in a worker goes through ``store_instance`` into the shared index and
outbox, exactly as a DIMSE receiver's C-STORE does; the main process relays the
outbox and indexes.

The archive accepts each connection and passes it (SCM_RIGHTS over a Unix
socket pair, ``vna.dispatch``, as for DIMSE receivers) to the worker with the
fewest open connections. Workers accepting
from the shared listening socket themselves balanced badly: clients that
connect together (four STOW-RS clients starting a batch) all landed in the
worker that woke first, and that worker's GIL then capped them all.

The wire is ``vna.dispatch``'s: ``r`` serving, ``d`` a connection closed,
``s`` something was stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

import uvicorn

from vna.dispatch import Dispatcher, report

log = logging.getLogger("vna.dicomweb.workers")

CHANNEL_FD_ENV = "VNA_HTTP_CHANNEL_FD"
"""Tells an ``http-worker`` which inherited descriptor is its channel to the archive."""


class HttpWorkers:
    """The archive's side: starts and watches the workers; a ``Dispatcher`` binds the
    port and hands them connections."""

    def __init__(self, host: str, port: int, count: int,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.count = count
        self._dispatcher = Dispatcher(host, port, backlog=1024, on_stored=on_stored)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        with self._lock:
            self._procs = [self._spawn() for _ in range(self.count)]
        self._dispatcher.start()

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker said it is serving."""
        return self._dispatcher.wait_ready(timeout)

    def open_connections(self) -> list[int]:
        """Open connections of each live worker, as the archive counts them."""
        return self._dispatcher.open_associations()

    def replace_exited(self) -> None:
        """A worker that died (OOM-killed, a crash) is replaced; meanwhile the others
        get its share of connections."""
        with self._lock:
            for i, proc in enumerate(self._procs):
                if proc.poll() is not None and not self._closed:
                    log.error("an HTTP worker exited; starting another",
                              extra={"pid": proc.pid, "returncode": proc.returncode})
                    self._procs[i] = self._spawn()

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, let the workers finish their requests, then stop them."""
        self._closed = True
        self._dispatcher.close()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def _spawn(self) -> subprocess.Popen[bytes]:
        channel = self._dispatcher.add_receiver()
        fd = channel.fileno()
        proc = subprocess.Popen([sys.executable, "-m", "vna", "http-worker"], pass_fds=[fd],
                                env={**os.environ, CHANNEL_FD_ENV: str(fd)})
        channel.close()  # the worker holds it now
        return proc


# ------------------------------------------------------------------ in a worker
class HandedConnectionsServer(uvicorn.Server):
    """uvicorn over the connections the archive hands over on ``channel``."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # No listening socket of its own: connections arrive on the channel.
        await super().startup(sockets=[])
        if self.should_exit:
            return
        loop = asyncio.get_running_loop()
        config = self.config
        channel = self.channel

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, _loop=loop)
            closed = protocol.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                try:
                    closed(exc)
                finally:
                    report(channel, b"d")

            setattr(protocol, "connection_lost", connection_lost)  # noqa: B010
            return protocol

        async def serve(conn: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(create_protocol, conn)
            except OSError as exc:
                log.warning("a connection could not be set up: %s", exc)
                conn.close()
                report(channel, b"d")

        def attach(conn: socket.socket) -> None:
            if self.should_exit:
                conn.close()
                report(channel, b"d")
                return
            conn.setblocking(False)
            task = loop.create_task(serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def receive() -> None:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(channel, 16, 8)
                except OSError:
                    data, fds = b"", []
                for fd in fds:
                    try:
                        loop.call_soon_threadsafe(attach, socket.socket(fileno=fd))
                    except RuntimeError:  # the loop is closed: we are stopping
                        os.close(fd)
                if not data:
                    self.should_exit = True  # the archive is gone
                    return

        self._tasks: set[asyncio.Task[None]] = set()
        threading.Thread(target=receive, name="http-handover", daemon=True).start()
        report(channel, b"r")


