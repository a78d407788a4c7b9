"""Spread connections over worker processes, the least busy first.

Both of ``vna run``'s sides use it: DIMSE associations go to its receiver
processes, HTTP connections to its HTTP workers (``services.dicomweb.workers``).

``vna run`` receives in several processes, so that receiving is not bound to one
GIL. Sharing the port with SO_REUSEPORT leaves the choice to a hash of the
client's address: four associations land three on one process about a third of
the time, and that process's GIL then caps them all. Instead the archive accepts
each connection itself and passes the socket (SCM_RIGHTS over a Unix socket pair)
to the receiver with the fewest open associations; a receiver reports each
association's end on the same pair.

Wire, one byte each: receiver -> archive ``r`` ready, ``d`` an association ended,
``s`` something was stored (the archive wakes its outbox relay at once rather
than at its next poll; at most one each ``STORED_REPORT_INTERVAL``, see
``StoredReports``); archive -> receiver ``c`` with a connection's descriptor
attached.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vna.dispatch")

CHANNEL_FD_ENV = "VNA_INGEST_CHANNEL_FD"
"""Tells an ``ingest-worker`` which inherited descriptor is its channel."""

STORED_REPORT_INTERVAL = 0.02
"""Seconds: below the outbox relay's linger (0.05 s), see ``StoredReports``."""


@dataclass
class _Receiver:
    channel: socket.socket
    open_associations: int = 0
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)


class Dispatcher:
    """Accepts on a port and hands each connection to a receiver process."""

    def __init__(self, host: str, port: int, *, backlog: int = 128,
                 on_stored: Callable[[], None] | None = None) -> None:
        self._listener = socket.create_server((host, port), backlog=backlog)
        self.on_stored = on_stored
        self._receivers: list[_Receiver] = []
        self._lock = threading.Lock()
        self._closed = False

    def add_receiver(self) -> socket.socket:
        """A channel for one more receiver; pass the returned end to its process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        receiver = _Receiver(ours)
        with self._lock:
            self._receivers.append(receiver)
        threading.Thread(target=self._listen, args=(receiver,), daemon=True,
                         name="dispatch-reports").start()
        return theirs

    def wait_ready(self, timeout: float) -> bool:
        """True once every live receiver said it is serving. One that died meanwhile
        is not waited for: the archive replaces it once it runs."""
        deadline = time.monotonic() + timeout
        for receiver in list(self._receivers):
            while not receiver.ready.wait(0.1):
                if not receiver.alive:
                    break
                if time.monotonic() > deadline:
                    return False
        return True

    def open_associations(self) -> list[int]:
        """Open associations of each live receiver, as the dispatcher counts them."""
        with self._lock:
            return [r.open_associations for r in self._receivers if r.alive]

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, daemon=True, name="dimse-acceptor").start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for receiver in self._receivers:
            with contextlib.suppress(OSError):
                receiver.channel.close()

    def _listen(self, receiver: _Receiver) -> None:
        while True:
            try:
                data = receiver.channel.recv(64)
            except OSError:
                data = b""
            if not data:
                break
            stored = False
            with self._lock:
                for byte in data:
                    if byte == ord("r"):
                        receiver.ready.set()
                    elif byte == ord("d"):
                        receiver.open_associations = max(0, receiver.open_associations - 1)
                    elif byte == ord("s"):
                        stored = True
            if stored and self.on_stored is not None:
                try:
                    self.on_stored()
                except Exception:
                    log.exception("on_stored hook failed")
        with self._lock:
            receiver.alive = False
        if not self._closed:
            log.error("a receiver process is gone; associations go to the others")

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        while True:
            with self._lock:
                alive = [r for r in self._receivers if r.alive]
                # One just started (replacing one that died) gets work once it serves.
                candidates = [r for r in alive if r.ready.is_set()] or alive
                if not candidates:
                    log.error("no receiver process left: connection refused")
                    return
                receiver = min(candidates, key=lambda r: r.open_associations)
                receiver.open_associations += 1
            try:
                socket.send_fds(receiver.channel, [b"c"], [conn.fileno()])
                return  # the receiver holds its own descriptor now; ours closes
            except OSError:
                with self._lock:
                    receiver.alive = False


def receive_connections(channel: socket.socket,
                        process: Callable[[socket.socket, Any], None]) -> threading.Thread:
    """In a receiver: hand each connection the archive passes to ``process``."""

    def run() -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(channel, 16, 8)
            except OSError:
                return
            if not data:
                return  # the archive is gone
            for fd in fds:
                conn = socket.socket(fileno=fd)
                try:
                    peer = conn.getpeername()
                except OSError:
                    conn.close()
                    report_ended(channel)
                    continue
                process(conn, peer)

    thread = threading.Thread(target=run, daemon=True, name="dimse-handover")
    thread.start()
    channel.sendall(b"r")
    return thread


def report_ended(channel: socket.socket) -> None:
    """Tell the archive one association of this receiver has ended."""
    report(channel, b"d")


def report(channel: socket.socket, message: bytes) -> None:
    """Tell the archive something (``r`` ready, ``d`` association ended, ``s``
    instance stored); never raises."""
    with contextlib.suppress(OSError):
        channel.sendall(message)


class StoredReports:
    """Reports ``s`` for an instance stored, unless this process reported one less
    than ``interval`` ago.

    A report per instance cost a receiver 8 % of its CPU at hundreds of instances a
    second (a send, and a wake-up of the archive's listener), and told the relay
    nothing new: it was draining anyway. An instance left unreported was committed
    within ``interval`` of a reported one, and the relay, woken by that report,
    drains again ``linger`` (longer than ``interval``) after each drain that moved
    something, so it goes out with the next batch; the relay's idle poll bounds
    the wait in any case."""

    def __init__(self, channel: socket.socket,
                 interval: float = STORED_REPORT_INTERVAL) -> None:
        self._channel = channel
        self._interval = interval
        self._last = -interval

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:  # a race between threads sends two: harmless
            self._last = now
            report(self._channel, b"s")
