"""The Bus contract, over every adapter: local (in-process) and RabbitMQ.

Delivery is asynchronous on RabbitMQ and synchronous on the local bus, so every
test waits for a condition with a deadline; neither adapter gets a sleep.
The local bus is durable through the outbox: a failed handler makes
``publish`` raise and the relay publishes again. ``publish_like_relay``
plays that part, so "redelivered after a handler failure" is asserted the
same way for both.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.processes import wait_for
from vna.adapters.bus.local import LocalBus
from vna.events import Event, InstanceIndexed, InstanceStored, encode_event
from vna.model import BlobKey
from vna.ports import Bus, Unavailable

STORED = "instance.stored"
INDEXED = "instance.indexed"


def stored_event() -> InstanceStored:
    uid = f"2.25.{uuid.uuid4().int}"
    return InstanceStored(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=f"{uid}.1", series_instance_uid=f"{uid}.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", blob_key=BlobKey("ab" * 32), size=1234,
    )


def indexed_event() -> InstanceIndexed:
    s = stored_event()
    return InstanceIndexed(
        sop_instance_uid=s.sop_instance_uid, study_instance_uid=s.study_instance_uid,
        series_instance_uid=s.series_instance_uid, blob_key=s.blob_key,
        stored_event_id=s.event_id, stored_at=s.occurred_at,
    )


def wire(*events: Event) -> list[tuple[str, bytes]]:
    return [(e.routing_key, encode_event(e)) for e in events]


def publish_like_relay(bus: Bus, messages: list[tuple[str, bytes]],
                       timeout: float = 30.0) -> int:
    """Publish until the bus accepts, as the outbox relay does; returns the attempts."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            bus.publish(messages)
            return attempts
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # relay back-off, bounded by the deadline


class Inbox:
    """A handler that records what it got, thread-safely."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False) -> None:
        self.events: list[Event] = []
        self.attempts: dict[str, int] = {}
        self.fail_first = fail_first
        self.always_fail = always_fail
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            n = self.attempts.get(event.event_id, 0) + 1
            self.attempts[event.event_id] = n
            if self.always_fail or n <= self.fail_first:
                raise RuntimeError("handler failure (test)")
            self.events.append(event)

    def ids(self) -> list[str]:
        with self._lock:
            return [e.event_id for e in self.events]

    def has(self, *events: Event) -> bool:
        got = set(self.ids())
        return all(e.event_id in got for e in events)


# ------------------------------------------------------------------ harnesses
class LocalHarness:
    """One process, one LocalBus: "another bus" is the same instance."""

    name = "local"
    unroutable = "dropped"

    def __init__(self) -> None:
        self.bus = LocalBus()
        self.bus.start()

    def new_bus(self) -> Any:
        return self.bus

    def restart_consumer(self, bus: Any, queue: str) -> Any:
        bus.unsubscribe(queue)
        return bus

    def close(self) -> None:
        self.bus.stop()


class RabbitHarness:
    """Separate connections in one throwaway namespace, deleted afterwards."""

    name = "rabbitmq"

    def __init__(self, url: str, namespace: str, keep_unrouted: bool = True) -> None:
        self.url = url
        self.namespace = namespace
        self.keep_unrouted = keep_unrouted
        self.unroutable = "kept" if keep_unrouted else "refused"
        self.buses: list[Any] = []

    def new_bus(self, **kwargs: Any) -> Any:
        from vna.adapters.bus.rabbitmq import RabbitBus

        bus = RabbitBus(self.url, namespace=self.namespace, keep_unrouted=self.keep_unrouted,
                        **kwargs)
        bus.start()
        self.buses.append(bus)
        return bus

    def restart_consumer(self, bus: Any, queue: str) -> Any:
        bus.stop()  # the process dies; its queue stays on the broker
        return self.new_bus()

    def close(self) -> None:
        used = {queue for bus in self.buses for queue in bus.queues()}
        cleaner = self.new_bus()
        try:
            cleaner.delete_namespace(used)
        finally:
            for bus in self.buses:
                bus.stop()


@pytest.fixture(params=[
    "local",
    pytest.param("rabbitmq", marks=pytest.mark.integration),
    pytest.param("rabbitmq-refuse-unrouted", marks=pytest.mark.integration),
])
def harness(request: pytest.FixtureRequest) -> Iterator[Any]:
    h: Any
    if request.param == "local":
        h = LocalHarness()
    else:
        h = RabbitHarness(request.getfixturevalue("amqp_url"),
                          request.getfixturevalue("bus_namespace"),
                          keep_unrouted=request.param == "rabbitmq")
    try:
        yield h
    finally:
        h.close()


def q(name: str) -> str:
    return f"test.{name}"


# ---------------------------------------------------------------------- tests
def test_protocol_is_implemented(harness: Any) -> None:
    bus = harness.new_bus()
    for method in ("publish", "subscribe", "start", "stop", "queue_depth", "check"):
        assert callable(getattr(bus, method))
    bus.check()


def test_publish_then_receive_exactly_the_event(harness: Any) -> None:
    bus = harness.new_bus()
    inbox = Inbox()
    bus.subscribe(q("index"), [STORED], inbox)
    event, sentinel = stored_event(), stored_event()
    bus.publish(wire(event))
    wait_for(lambda: inbox.has(event), 15, 0.02, "the event")
    bus.publish(wire(sentinel))
    wait_for(lambda: inbox.has(sentinel), 15, 0.02, "the sentinel")
    got = [e for e in inbox.events if e.event_id == event.event_id]
    assert len(got) == 1
    assert got[0] == event  # every field survives the wire, event_id included
    assert isinstance(got[0], InstanceStored)


def test_routing_keys_and_wildcards(harness: Any) -> None:
    bus = harness.new_bus()
    stored_only, everything = Inbox(), Inbox()
    bus.subscribe(q("stored-only"), [STORED], stored_only)
    bus.subscribe(q("everything"), ["instance.*"], everything)
    s, i = stored_event(), indexed_event()
    bus.publish(wire(s, i))
    wait_for(lambda: everything.has(s, i), 15, 0.02, "both events on the wildcard queue")
    wait_for(lambda: stored_only.has(s), 15, 0.02, "instance.stored on its queue")
    # A later sentinel proves the indexed event was not merely slow to arrive.
    sentinel = stored_event()
    bus.publish(wire(sentinel))
    wait_for(lambda: stored_only.has(sentinel), 15, 0.02, "sentinel")
    assert i.event_id not in stored_only.ids()


def test_every_bound_queue_gets_its_copy(harness: Any) -> None:
    bus = harness.new_bus()
    a, b = Inbox(), Inbox()
    bus.subscribe(q("a"), [STORED], a)
    bus.subscribe(q("b"), [STORED], b)
    events = [stored_event() for _ in range(10)]
    bus.publish(wire(*events))
    wait_for(lambda: a.has(*events) and b.has(*events), 15, 0.02, "both queues")
    assert sorted(a.ids()) == sorted(b.ids()) == sorted(e.event_id for e in events)


def test_redelivery_after_handler_exception(harness: Any) -> None:
    bus = harness.new_bus()
    inbox = Inbox(fail_first=2)
    bus.subscribe(q("flaky"), [STORED], inbox)
    event = stored_event()
    publish_like_relay(bus, wire(event))
    wait_for(lambda: inbox.has(event), 30, 0.02, "the event after two failures")
    assert inbox.attempts[event.event_id] == 3
    assert inbox.ids() == [event.event_id]


def test_unroutable_is_never_silently_delivered(harness: Any) -> None:
    bus = harness.new_bus()
    other = Inbox()
    bus.subscribe(q("other"), [STORED], other)
    orphan = indexed_event()  # nobody is bound to instance.indexed
    if harness.unroutable == "refused":
        from vna.adapters.bus.rabbitmq import Unroutable

        with pytest.raises(Unroutable):
            bus.publish(wire(orphan))
    else:
        bus.publish(wire(orphan))
        if harness.unroutable == "kept":
            # Confirmed and kept by the broker, for whoever binds later or a person.
            wait_for(lambda: bus.unrouted_count() == 1, 15, 0.05, "the kept message")
    sentinel = stored_event()
    bus.publish(wire(sentinel))
    wait_for(lambda: other.has(sentinel), 15, 0.02, "sentinel")
    assert orphan.event_id not in other.ids()


def test_at_least_once_across_a_consumer_restart(harness: Any) -> None:
    publisher = harness.new_bus()
    consumer = harness.new_bus()
    first = Inbox()
    consumer.subscribe(q("restart"), [STORED], first)
    e1 = stored_event()
    publisher.publish(wire(e1))
    wait_for(lambda: first.has(e1), 15, 0.02, "e1 before the restart")

    consumer = harness.restart_consumer(consumer, q("restart"))
    # Published while nobody consumes: the queue keeps them.
    waiting = [stored_event() for _ in range(5)]
    publisher.publish(wire(*waiting))

    second = Inbox()
    consumer.subscribe(q("restart"), [STORED], second)
    wait_for(lambda: second.has(*waiting), 15, 0.02, "events published during the restart")
    assert not set(first.ids()) & {e.event_id for e in waiting}
    assert e1.event_id not in second.ids()  # acknowledged before: not delivered again


def test_queue_depth_counts_waiting_messages(harness: Any) -> None:
    bus = harness.new_bus()
    inbox = Inbox()
    bus.subscribe(q("depth"), [STORED], inbox)
    consumer = harness.restart_consumer(bus, q("depth"))
    publisher = harness.new_bus()
    publisher.publish(wire(*[stored_event() for _ in range(3)]))
    if harness.name == "rabbitmq":
        # The new consumer process knows its queue once it declared it.
        consumer.declare(q("depth"), [STORED])
    wait_for(lambda: consumer.queue_depth() == 3, 15, 0.05, "depth 3")
    consumer.subscribe(q("depth"), [STORED], inbox)
    wait_for(lambda: consumer.queue_depth() == 0, 15, 0.05, "depth 0 after consuming")
    assert len(inbox.events) == 3


def test_publish_nothing_is_fine(harness: Any) -> None:
    bus = harness.new_bus()
    bus.publish([])
    bus.check()


# ------------------------------------------------------------ RabbitMQ only
@pytest.fixture
def rabbit(amqp_url: str, bus_namespace: str) -> Iterator[RabbitHarness]:
    h = RabbitHarness(amqp_url, bus_namespace)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.integration
def test_rabbit_poison_message_is_dead_lettered(rabbit: RabbitHarness) -> None:
    bus = rabbit.new_bus(delivery_limit=2)
    inbox = Inbox(always_fail=True)
    bus.subscribe(q("poison"), [STORED], inbox)
    event = stored_event()
    bus.publish(wire(event))
    wait_for(lambda: bus.dead_letter_count(q("poison")) == 1, 30, 0.05, "dead-lettered")
    # Tried more than once, then given up on; nothing is left in the queue.
    assert inbox.attempts[event.event_id] >= 2
    assert bus.message_count(q("poison")) == 0


@pytest.mark.integration
def test_rabbit_undecodable_message_is_dead_lettered_at_once(rabbit: RabbitHarness) -> None:
    bus = rabbit.new_bus()
    inbox = Inbox()
    bus.subscribe(q("garbage"), [STORED], inbox)
    bus.publish([(STORED, b'{"type": "no.such.event"}')])
    wait_for(lambda: bus.dead_letter_count(q("garbage")) == 1, 15, 0.05, "dead-lettered")
    good = stored_event()
    bus.publish(wire(good))
    wait_for(lambda: inbox.has(good), 15, 0.02, "the next good event")
    assert inbox.ids() == [good.event_id]


@pytest.mark.integration
def test_rabbit_unreachable_fails_fast() -> None:
    from vna.adapters.bus.rabbitmq import RabbitBus
    from vna.testing.s3server import free_port

    bus = RabbitBus(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=2.0)
    try:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            bus.publish(wire(stored_event()))
        assert time.monotonic() - began < 8
        with pytest.raises(Unavailable):
            bus.check()
        assert bus.queue_depth() == 0
        # Subscribing while the broker is away does not fail: it consumes later.
        bus.subscribe(q("later"), [STORED], Inbox())
    finally:
        bus.stop()


@pytest.mark.integration
def test_rabbit_handler_runs_off_the_event_loop(rabbit: RabbitHarness) -> None:
    """A slow handler does not stop publishing on the same bus (heartbeats, confirms)."""
    bus = rabbit.new_bus()
    release = threading.Event()
    started = threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(20)

    bus.subscribe(q("slow"), [STORED], slow)
    bus.publish(wire(stored_event()))
    assert started.wait(15)
    began = time.monotonic()
    bus.publish(wire(indexed_event()))  # kept as unrouted; must confirm meanwhile
    assert time.monotonic() - began < 5
    release.set()

