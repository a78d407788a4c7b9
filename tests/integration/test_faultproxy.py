"""The TCP fault proxy, and the adapters' behaviour when it cuts them off."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.support.processes import wait_for
from vna.events import InstanceStored, encode_event
from vna.model import BlobKey
from vna.ports import Unavailable
from vna.testing.faultproxy import FaultProxy


class EchoServer:
    """A loopback TCP echo server: the 'real service' behind the proxy."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as p:
        yield p


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_forwards_bytes_both_ways(proxy: FaultProxy) -> None:
    payload = hashlib.sha256(b"seed").digest() * 40_000  # ~1.3 MB, many segments
    assert _roundtrip(proxy.port, payload) == payload
    assert proxy.accepted == 1


def test_cut_resets_open_connections_and_refuses_new(proxy: FaultProxy) -> None:
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    conn.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    wait_for(lambda: proxy.connections() == 1, 5, 0.01, "one proxied connection")
    proxy.cut()
    assert proxy.is_cut
    # The open connection is dead: reading gives EOF or a reset, never data.
    try:
        conn.sendall(b"more")
        assert conn.recv(4) == b""
    except OSError:
        pass
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert proxy.connections() == 0


def test_restore_listens_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.cut()
    proxy.restore()
    assert proxy.port == port
    assert not proxy.is_cut
    assert _roundtrip(port, b"back again") == b"back again"


def test_cut_and_restore_repeatedly(proxy: FaultProxy) -> None:
    for i in range(5):
        assert _roundtrip(proxy.port, f"round {i}".encode()) == f"round {i}".encode()
        proxy.cut()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.restore()
    assert proxy.accepted == 5


def test_upstream_down_resets_the_client() -> None:
    from vna.testing.s3server import free_port

    with FaultProxy("127.0.0.1", free_port(), connect_timeout=1) as p:
        try:
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                data = s.recv(10)
        except (ConnectionResetError, BrokenPipeError):
            data = b""  # reset, maybe before connect() itself returned
        assert data == b""
        assert p.connections() == 0


# ------------------------------------------------------------------ RabbitMQ
def _event() -> list[tuple[str, bytes]]:
    e = InstanceStored(sop_instance_uid="2.25.1", sop_class_uid="1.2.3",
                       study_instance_uid="2.25.2", series_instance_uid="2.25.3",
                       transfer_syntax_uid="1.2.840.10008.1.2.1",
                       blob_key=BlobKey("cd" * 32), size=1)
    return [(e.routing_key, encode_event(e))]


@pytest.mark.integration
def test_rabbit_bus_through_a_cut(amqp_url: str, bus_namespace: str) -> None:
    from urllib.parse import urlparse

    from vna.adapters.bus.rabbitmq import RabbitBus

    broker = urlparse(amqp_url)
    with FaultProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as p:
        url = f"amqp://{broker.username}:{broker.password}@127.0.0.1:{p.port}/"
        bus = RabbitBus(url, namespace=bus_namespace, timeout=3.0)
        received: list[str] = []
        try:
            bus.subscribe("test.cut", ["instance.stored"],
                          lambda ev: received.append(ev.event_id))
            bus.publish(_event())
            wait_for(lambda: len(received) == 1, 15, 0.02, "delivery before the cut")

            p.cut()
            wait_for(lambda: _raises_unavailable(bus.check), 10, 0.02, "check to notice")
            began = time.monotonic()
            with pytest.raises(Unavailable):
                bus.publish(_event())
            assert time.monotonic() - began < 3  # fails fast, does not hang

            p.restore()
            # Publishing resumes once the robust connection is back ...
            wait_for(lambda: not _raises_unavailable(lambda: bus.publish(_event())), 30, 0.1,
                     "publishing after the restore")
            # ... and so does consuming (the consumer was restored with the channel).
            wait_for(lambda: len(received) >= 2, 15, 0.02, "delivery after the restore")
        finally:
            try:
                bus.delete_namespace()
            finally:
                bus.stop()


def _raises_unavailable(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except Unavailable:
        return True
    return False


# ------------------------------------------------------------------------ S3
@pytest.mark.integration
def test_s3_blob_store_through_a_cut(s3_server: S3Server, s3_bucket: str,
                                     tmp_path: Path) -> None:
    from urllib.parse import urlparse

    from vna.adapters.blob.s3 import S3BlobStore

    real = urlparse(s3_server.url)
    with FaultProxy(real.hostname or "127.0.0.1", real.port or 80) as p:
        store = S3BlobStore.from_url(f"s3://{s3_bucket}?endpoint=http://127.0.0.1:{p.port}",
                                     access_key=s3_server.access_key,
                                     secret_key=s3_server.secret_key)

        def staged(data: bytes) -> tuple[BlobKey, Path]:
            path = tmp_path / hashlib.sha256(data).hexdigest()
            path.write_bytes(data)
            return BlobKey(path.name), path

        key, path = staged(b"before the cut")
        assert store.put_file(key, path)

        p.cut()
        began = time.monotonic()
        key2, path2 = staged(b"during the cut")
        with pytest.raises(Unavailable):
            store.put_file(key2, path2)
        with pytest.raises(Unavailable):
            store.check()
        with pytest.raises(Unavailable):
            store.read_range(key, 0)
        # Quick enough for a C-STORE to be answered 0xA700 rather than time out.
        assert time.monotonic() - began < 10

        p.restore()
        assert store.put_file(key2, path2)
        assert store.read_range(key, 0) == b"before the cut"
        assert store.read_range(key2, 0) == b"during the cut"
