"""A TCP proxy on loopback that a test can cut and restore.

Put it in front of a real service (RabbitMQ, S3, PostgreSQL) and point the
adapter at the proxy. ``cut()`` resets every open connection and closes the
listening socket, so new connections are refused at once, exactly what a
client sees when a broker or store dies; ``restore()`` listens again on the
same port. The real service is never touched.

>>> with FaultProxy("127.0.0.1", 5672) as proxy:
...     bus = RabbitBus(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
...     proxy.cut()      # publish now raises Unavailable
...     proxy.restore()  # and works again
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
from types import TracebackType

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Drop a connection at once, as on a crash.

    ``shutdown`` first: a bare ``close`` does not wake a pump thread blocked in
    ``recv`` on the same socket, and the kernel keeps the connection open until
    that call returns. SO_LINGER 0 makes the final close an RST.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._done = 0

    def start(self) -> None:
        for src, dst, name in ((self.client, self.upstream, "up"),
                               (self.upstream, self.client, "down")):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                             name=f"faultproxy-{name}").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    # Half-close: pass the EOF on and let the other direction finish.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(data)
        except OSError:
            # One side broke: the whole pair goes, as a real network failure would.
            self.reset()
            return
        with self._lock:
            self._done += 1
            finished = self._done == 2
        if finished:
            self.close()

    def reset(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._forget(self)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``target_host:target_port`` until cut.

    Parameters
    ----------
    target_host, target_port:
        The real service.
    port:
        Where to listen on loopback; 0 picks a free port (kept across cut/restore).
    connect_timeout:
        How long to wait for the real service when a client connects.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0,
                 connect_timeout: float = 3.0) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = port
        self.connect_timeout = connect_timeout
        self._pairs: set[_Pair] = set()
        self._guard = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self.accepted = 0
        """Client connections accepted since the proxy was created."""

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        """Listen (on the same port as before after a cut). Returns self."""
        with self._guard:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            self.port = int(listener.getsockname()[1])
            self._listener = listener
            # Drain stale wake-ups so the new accept loop does not exit at once.
            self._wake_r.setblocking(False)
            try:
                while self._wake_r.recv(1024):
                    pass
            except BlockingIOError:
                pass
            self._thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                            daemon=True, name="faultproxy-accept")
            self._thread.start()
        return self

    def cut(self) -> None:
        """Reset every connection and refuse new ones until ``restore()``."""
        with self._guard:
            listener, self._listener = self._listener, None
            thread, self._thread = self._thread, None
            pairs = list(self._pairs)
        if listener is not None:
            self._wake_w.send(b"x")
            if thread is not None:
                thread.join(timeout=5)
            listener.close()
        for pair in pairs:
            pair.reset()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self.start()

    def stop(self) -> None:
        """Cut and release the proxy's own sockets."""
        self.cut()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def connections(self) -> int:
        """Client connections open through the proxy right now."""
        with self._guard:
            return len(self._pairs)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ internals
    def _forget(self, pair: _Pair) -> None:
        with self._guard:
            self._pairs.discard(pair)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                ready, _, _ = select.select([listener, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
                upstream.settimeout(None)
            except OSError as exc:
                # The real service is away: the client sees its connection reset.
                log.debug("fault proxy: upstream %s:%s unreachable: %s", *self.target, exc)
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, client, upstream)
            with self._guard:
                if self._listener is not listener:
                    # Cut while we were connecting: this connection must not survive.
                    _reset(client)
                    _reset(upstream)
                    return
                self._pairs.add(pair)
                self.accepted += 1
            pair.start()
