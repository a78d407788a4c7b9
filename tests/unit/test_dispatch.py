"""vna run's dispatcher hands each connection to the receiver with the fewest open."""

from __future__ import annotations

import socket
import threading
from typing import Any

from tests.support.processes import free_port, wait_for
from vna.dispatch import (
    STORED_REPORT_INTERVAL,
    Dispatcher,
    StoredReports,
    receive_connections,
    report_ended,
)
from vna.usecases.relay import OutboxRelay


class FakeReceiver:
    """Stands for a receiver process: keeps what it is handed, reports ends on demand."""

    def __init__(self, dispatcher: Dispatcher, name: str, log: list[str],
                 changed: threading.Condition) -> None:
        self.channel = dispatcher.add_receiver()
        self.name = name
        self.connections: list[socket.socket] = []
        self.log = log
        self.changed = changed
        receive_connections(self.channel, self.take)

    def take(self, conn: socket.socket, _peer: Any) -> None:
        with self.changed:
            self.connections.append(conn)
            self.log.append(self.name)
            self.changed.notify_all()

    def end_one(self) -> None:
        self.connections.pop().close()
        report_ended(self.channel)


def test_least_busy_receiver_gets_the_next_association() -> None:
    port = free_port()
    dispatcher = Dispatcher("127.0.0.1", port)
    log: list[str] = []
    changed = threading.Condition()
    a, b = (FakeReceiver(dispatcher, n, log, changed) for n in "ab")
    assert dispatcher.wait_ready(timeout=10)
    dispatcher.start()
    clients: list[socket.socket] = []

    def connect() -> str:
        with changed:
            before = len(log)
            clients.append(socket.create_connection(("127.0.0.1", port)))
            assert changed.wait_for(lambda: len(log) > before, timeout=10)
            return log[-1]

    try:
        first = [connect() for _ in range(4)]
        assert sorted(first) == ["a", "a", "b", "b"]  # never three on one
        assert dispatcher.open_associations() == [2, 2]
        b.end_one()
        wait_for(lambda: dispatcher.open_associations() == [2, 1], timeout=10,
                 what="the end reported")
        assert connect() == "b"
        assert dispatcher.open_associations() == [2, 2]
        assert (len(a.connections), len(b.connections)) == (2, 2)
    finally:
        for c in clients:
            c.close()
        dispatcher.close()


def test_a_receiver_gone_leaves_the_others_serving() -> None:
    port = free_port()
    dispatcher = Dispatcher("127.0.0.1", port)
    log: list[str] = []
    changed = threading.Condition()
    a = FakeReceiver(dispatcher, "a", log, changed)
    gone = dispatcher.add_receiver()
    gone.sendall(b"r")
    assert dispatcher.wait_ready(timeout=10)
    gone.close()
    dispatcher.start()
    clients = []
    try:
        for n in range(1, 4):
            with changed:
                clients.append(socket.create_connection(("127.0.0.1", port)))
                assert changed.wait_for(lambda n=n: len(log) >= n, timeout=10)
        assert log == ["a", "a", "a"]
        assert len(a.connections) == 3
    finally:
        for c in clients:
            c.close()
        dispatcher.close()


def test_wait_ready_does_not_wait_for_a_receiver_that_died() -> None:
    dispatcher = Dispatcher("127.0.0.1", free_port())
    try:
        ready = dispatcher.add_receiver()
        dead = dispatcher.add_receiver()
        silent = dispatcher.add_receiver()
        ready.sendall(b"r")
        dead.close()  # killed before it ever served
        assert not dispatcher.wait_ready(timeout=0.5)  # ``silent`` lives but never served
        silent.sendall(b"r")
        assert dispatcher.wait_ready(timeout=10)
        assert len(dispatcher.open_associations()) == 2  # the dead one gets nothing
        ready.close()
        silent.close()
    finally:
        dispatcher.close()


def _pending(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(64)
    except BlockingIOError:
        return b""


def test_stored_reports_send_one_per_interval() -> None:
    ours, archive = socket.socketpair()
    with ours, archive:
        reports = StoredReports(ours, interval=3600)
        for _ in range(5):
            reports()
        assert _pending(archive) == b"s"  # the first, then nothing within the interval
        every = StoredReports(ours, interval=0)
        every()
        every()
        assert _pending(archive) == b"ss"


def test_unreported_instances_are_drained_by_the_relays_linger() -> None:
    # StoredReports leaves an instance unreported only because the relay, woken by
    # an earlier report, drains again after its linger: the linger must be longer.
    relay = OutboxRelay(index=None, bus=None)  # type: ignore[arg-type]
    assert relay.linger > STORED_REPORT_INTERVAL
