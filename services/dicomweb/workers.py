"""HTTP from several processes: the archive accepts, its workers serve.

In one process, STOW-RS is bound to one GIL: parsing multipart bodies, hashing
and framing are Python. ``vna run`` (and ``vna dicomweb``) therefore bind the
HTTP port once and run ``VNA_HTTP_WORKERS`` worker processes (``vna
http-worker``), each serving the same application over its own ``Deps``. A
STOW-RS in a worker goes through ``store_instance`` into the shared index and
outbox, exactly as a DIMSE receiver's C-STORE does; the main process relays the
outbox and indexes.

The archive accepts each connection and passes it (SCM_RIGHTS over a Unix
socket pair) to the worker with the fewest open connections. Workers accepting
from the shared listening socket themselves balanced badly: clients that
connect together (four STOW-RS clients starting a batch) all landed in the
worker that woke first, and that worker's GIL then capped them all.

Wire, one byte each: worker -> archive ``r`` serving, ``d`` a connection
closed, ``s`` something was stored (the archive wakes its outbox relay at once
rather than at its next poll); archive -> worker ``c`` with a connection's
descriptor attached.
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

import uvicorn

log = logging.getLogger("vna.dicomweb.workers")

CHANNEL_FD_ENV = "VNA_HTTP_CHANNEL_FD"
"""Tells an ``http-worker`` which inherited descriptor is its channel to the archive."""


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    open_connections: int = 0
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)


class HttpWorkers:
    """The archive's side: binds the port, starts and watches the workers, hands them
    connections, stops them."""

    def __init__(self, host: str, port: int, count: int,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.count = count
        self.on_stored = on_stored
        self._listener = socket.create_server((host, port), backlog=1024)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        with self._lock:
            self._workers = [self._spawn() for _ in range(self.count)]
        threading.Thread(target=self._accept_loop, daemon=True, name="http-acceptor").start()

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker said it is serving."""
        return all(w.ready.wait(timeout) for w in list(self._workers))

    def open_connections(self) -> list[int]:
        """Open connections of each live worker, as the archive counts them."""
        with self._lock:
            return [w.open_connections for w in self._workers if w.alive]

    def replace_exited(self) -> None:
        """A worker that died (OOM-killed, a crash) is replaced; meanwhile the others
        get its share of connections."""
        with self._lock:
            for i, worker in enumerate(self._workers):
                if worker.proc.poll() is not None and not self._closed:
                    log.error("an HTTP worker exited; starting another",
                              extra={"pid": worker.proc.pid,
                                     "returncode": worker.proc.returncode})
                    worker.alive = False
                    with contextlib.suppress(OSError):
                        worker.channel.close()
                    self._workers[i] = self._spawn()

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, let the workers finish their requests, then stop them."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
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

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = theirs.fileno()
        proc = subprocess.Popen([sys.executable, "-m", "vna", "http-worker"], pass_fds=[fd],
                                env={**os.environ, CHANNEL_FD_ENV: str(fd)})
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
                data = b""
            if not data:
                break  # the worker is gone
            stored = False
            with self._lock:
                for byte in data:
                    if byte == ord("r"):
                        worker.ready.set()
                    elif byte == ord("d"):
                        worker.open_connections = max(0, worker.open_connections - 1)
                    elif byte == ord("s"):
                        stored = True
            if stored and self.on_stored is not None:
                try:
                    self.on_stored()
                except Exception:
                    log.exception("on_stored hook failed")
        with self._lock:
            worker.alive = False

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            with conn:
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        while True:
            with self._lock:
                alive = [w for w in self._workers if w.alive]
                # One just started (replacing one that died) gets work once it serves.
                candidates = [w for w in alive if w.ready.is_set()] or alive
                if not candidates:
                    log.error("no HTTP worker left: connection refused")
                    return
                worker = min(candidates, key=lambda w: w.open_connections)
                worker.open_connections += 1
            try:
                socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
                return  # the worker holds its own descriptor now; ours closes
            except OSError:
                with self._lock:
                    worker.alive = False


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


def report(channel: socket.socket, message: bytes) -> None:
    """Tell the archive something (``r``, ``d``, ``s``); never raises."""
    with contextlib.suppress(OSError):
        channel.sendall(message)
