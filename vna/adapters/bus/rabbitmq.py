"""RabbitMQ bus (aio-pika): the only module that imports it.

The core is thread-based (pynetdicom, SQLAlchemy), so aio-pika runs on an
event loop of its own in a background thread and the ``Bus`` methods bridge to
it with ``run_coroutine_threadsafe``.

Topology, per namespace ``ns`` (default ``vna``; several archives can share a broker):

- ``ns``: durable topic exchange every event is published to (routing key =
  event type), persistent messages, publisher confirms, ``mandatory``.
- ``ns:<queue>``: a quorum queue per subscriber queue name, bound with its
  routing keys; manual acks after the handler returned; a failing handler's
  message is requeued until ``delivery_limit``, then dead-lettered through
  ``ns.dlx`` (direct) into ``ns:<queue>.dlq``. Undecodable messages go there at once.
- ``ns.unrouted`` (when ``keep_unrouted``, the default): the exchange's alternate
  exchange and a capped queue, so an event no queue is bound to yet (e.g.
  ``instance.indexed`` before any replicator exists) is kept, not dropped, and
  confirming it still proves the broker has it. With ``keep_unrouted=False``
  an unroutable publish raises ``Unroutable`` (an ``Unavailable``) instead.

Connection loss: ``connect_robust`` reconnects every ``reconnect_interval`` and
restores channels, queues, bindings and consumers. While disconnected,
``publish`` and ``check`` raise ``Unavailable`` at once (the outbox keeps the
events); unacknowledged deliveries come back (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, PublishError

from vna.events import Event, decode_event
from vna.ports import BatchHandler, EventHandler, Unavailable

log = logging.getLogger("vna.bus")
T = TypeVar("T")

DELIVERY_LIMIT = 5
UNROUTED_MAX = 100_000


class Unroutable(Unavailable):
    """No queue is bound for the routing key (only with ``keep_unrouted=False``)."""


@dataclass
class _Subscription:
    queue: str
    routing_keys: tuple[str, ...]
    handler: EventHandler | None
    """None: declared (bound, messages wait) but not consumed."""
    channel: AbstractChannel | None = None
    amqp_queue: AbstractQueue | None = None
    consumer_tag: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    setting_up: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: list[tuple[Event, AbstractIncomingMessage]] = field(default_factory=list)
    """Delivered to a ``BatchHandler``, not yet handled."""
    flushing: bool = False


class RabbitBus:
    """``Bus`` over RabbitMQ.

    Parameters
    ----------
    url:
        ``amqp://user:password@host:port/vhost``.
    namespace:
        Exchange name and queue prefix.
    prefetch:
        Unacknowledged deliveries per consumer.
    timeout:
        Seconds to wait for the broker (connect, confirms) before ``Unavailable``.
    workers:
        Threads running handlers (handlers are synchronous: database writes).
    """

    def __init__(self, url: str, *, namespace: str = "vna", prefetch: int = 64,
                 timeout: float = 5.0, delivery_limit: int = DELIVERY_LIMIT,
                 workers: int = 8, keep_unrouted: bool = True,
                 reconnect_interval: float = 1.0) -> None:
        self.url = url
        self.namespace = namespace
        self.prefetch = prefetch
        self.timeout = timeout
        self.delivery_limit = delivery_limit
        self.keep_unrouted = keep_unrouted
        self.reconnect_interval = reconnect_interval
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqp", daemon=True)
        self._thread.start()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="amqp-handler")
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        self._inflight: set[asyncio.Future[Any]] = set()
        self._connector: asyncio.Future[None] | None = None
        self._ready: asyncio.Event | None = None
        self._stopped = False
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------ plumbing
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._stopped:
            coro.close()
            raise Unavailable("message bus stopped")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout if timeout is not None else self.timeout * 2)
        except TimeoutError as exc:
            future.cancel()
            raise Unavailable("message broker did not answer in time") from exc

    def queue_name(self, queue: str) -> str:
        """The broker-side name of subscriber queue ``queue``."""
        return f"{self.namespace}:{queue}"

    @property
    def _connected(self) -> bool:
        conn = self._connection
        # A robust connection is never "closed" while it reconnects; ``connected``
        # is the event that says whether a transport is up right now.
        return (conn is not None and not conn.is_closed and conn.connected.is_set()
                and self._ready is not None and self._ready.is_set())

    def _ensure_connector(self) -> None:
        """Start connecting in the background (once); never blocks, never raises."""
        with self._start_lock:
            if self._connector is not None or self._stopped:
                return

            async def _begin() -> None:
                self._ready = asyncio.Event()
                self._connector = asyncio.ensure_future(self._connect_forever())

            asyncio.run_coroutine_threadsafe(_begin(), self._loop).result(self.timeout)

    async def _connect_forever(self) -> None:
        delay = self.reconnect_interval
        while not self._stopped:
            # Built by hand rather than with connect_robust so that stop() can close
            # an attempt still in progress (its reconnect loop survives cancellation).
            self._connection = aio_pika.RobustConnection(
                make_url(self.url, reconnect_interval=self.reconnect_interval),
                reconnect_interval=self.reconnect_interval)
            try:
                await asyncio.wait_for(self._connection.connect(timeout=self.timeout),
                                       self.timeout)
                await self._declare_topology(self._connection)
            except (OSError, AMQPError, TimeoutError, ChannelInvalidStateError) as exc:
                if self._connection is not None:
                    with contextlib.suppress(Exception):
                        await self._connection.close()
                    self._connection = None
                log.warning("waiting for the message broker: %s", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            # From here on the robust connection restores itself and its channels.
            assert self._ready is not None
            self._ready.set()
            log.info("message broker connected", extra={"namespace": self.namespace})
            for sub in list(self._subscriptions.values()):
                await self._setup(sub)
            return

    async def _declare_topology(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        arguments: dict[str, Any] = {}
        if self.keep_unrouted:
            unrouted = await channel.declare_exchange(
                f"{self.namespace}.unrouted", aio_pika.ExchangeType.FANOUT, durable=True)
            keep = await channel.declare_queue(
                f"{self.namespace}.unrouted", durable=True,
                arguments={"x-max-length": UNROUTED_MAX, "x-overflow": "drop-head"})
            await keep.bind(unrouted)
            arguments["alternate-exchange"] = f"{self.namespace}.unrouted"
        await channel.declare_exchange(f"{self.namespace}.dlx", aio_pika.ExchangeType.DIRECT,
                                       durable=True)
        self._exchange = await channel.declare_exchange(
            self.namespace, aio_pika.ExchangeType.TOPIC, durable=True, arguments=arguments)
        self._publish_channel = channel

    async def _setup(self, sub: _Subscription) -> None:
        """Declare ``sub``'s queues and bindings and, with a handler, consume."""
        async with sub.setting_up:  # the connector and subscribe() may both get here
            if self._connection is None or sub.ready.is_set():
                return
            await self._setup_locked(sub)

    async def _setup_locked(self, sub: _Subscription) -> None:
        assert self._connection is not None
        name = self.queue_name(sub.queue)
        try:
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            dlx = await channel.get_exchange(f"{self.namespace}.dlx")
            dlq = await channel.declare_queue(f"{name}.dlq", durable=True,
                                              arguments={"x-queue-type": "quorum"})
            await dlq.bind(dlx, routing_key=name)
            queue = await channel.declare_queue(name, durable=True, arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": f"{self.namespace}.dlx",
                "x-dead-letter-routing-key": name,
            })
            exchange = await channel.get_exchange(self.namespace)
            for key in sub.routing_keys:
                await queue.bind(exchange, routing_key=key)
            sub.channel, sub.amqp_queue = channel, queue
            if sub.handler is not None:
                sub.consumer_tag = await queue.consume(self._on_message_for(sub))
            sub.ready.set()
        except (AMQPError, OSError, ChannelInvalidStateError) as exc:
            # The connector (or the next subscribe) tries again; a precondition
            # failure (queue exists with other arguments) needs a person.
            log.error("could not set up queue: %s", exc, extra={"queue": name})

    def _on_message_for(self, sub: _Subscription) -> Any:
        name = self.queue_name(sub.queue)

        async def on_message(message: AbstractIncomingMessage) -> None:
            handler = sub.handler
            try:
                event = decode_event(message.body)
            except ValueError:
                log.error("undecodable message dead-lettered", extra={"queue": name})
                await message.reject(requeue=False)
                return
            if handler is None:  # unsubscribed meanwhile: let another consumer have it
                await message.nack(requeue=True)
                return
            if isinstance(handler, BatchHandler):
                sub.waiting.append((event, message))
                if not sub.flushing:
                    sub.flushing = True
                    self._loop.create_task(self._flush(sub))
                return
            task = self._loop.run_in_executor(self._executor, handler, event)
            self._inflight.add(task)
            try:
                await task
            except Exception:
                # No event contents in the log: they may identify a patient.
                log.exception("handler failed; message requeued",
                              extra={"queue": name, "event_id": event.event_id})
                with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError):
                    await message.nack(requeue=True)
                return
            finally:
                self._inflight.discard(task)
            try:
                await message.ack()
            except (AMQPError, ChannelInvalidStateError, OSError):
                # The channel went away after the handler ran: the broker delivers
                # it again, and handlers are idempotent (at least once).
                log.warning("ack lost with the connection", extra={"queue": name})

        return on_message

    async def _flush(self, sub: _Subscription) -> None:
        """Hand what has been delivered to the subscription's ``BatchHandler``,
        batch after batch; ack each batch after it returns, requeue it if it fails."""
        name = self.queue_name(sub.queue)
        try:
            while sub.waiting:
                await asyncio.sleep(0)  # let deliveries already read join this batch
                handler = sub.handler
                size = handler.max_batch if isinstance(handler, BatchHandler) else 1
                batch, sub.waiting = sub.waiting[:size], sub.waiting[size:]
                ok = isinstance(handler, BatchHandler)
                if isinstance(handler, BatchHandler):
                    task = self._loop.run_in_executor(
                        self._executor, handler.handle, [event for event, _ in batch])
                    self._inflight.add(task)
                    try:
                        await task
                    except Exception:
                        ok = False
                        log.exception("batch handler failed; messages requeued",
                                      extra={"queue": name, "count": len(batch)})
                    finally:
                        self._inflight.discard(task)
                for _, message in batch:
                    with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError):
                        # A lost ack means redelivery; handlers are idempotent.
                        await (message.ack() if ok else message.nack(requeue=True))
        finally:
            sub.flushing = False

    async def _first_connection(self) -> None:
        """Before the first connection ever, wait for it a moment (a service that
        just started should not fail its first publish); after that, never wait:
        a broker that went away is reported at once."""
        assert self._ready is not None
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), self.timeout)

    # ------------------------------------------------------------ Bus
    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish and wait for the broker's confirms; ``Unavailable`` otherwise."""
        if not messages:
            return
        self._ensure_connector()

        async def _publish() -> None:
            await self._first_connection()
            if not self._connected or self._exchange is None:
                raise Unavailable("message broker not connected")
            exchange = self._exchange
            publishes = [
                exchange.publish(
                    aio_pika.Message(body=payload, content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=routing_key, mandatory=True, timeout=self.timeout)
                for routing_key, payload in messages
            ]
            results = await asyncio.gather(*publishes, return_exceptions=True)
            for result in results:
                if isinstance(result, PublishError):
                    raise Unroutable("no queue is bound for a published routing key")
            for result in results:
                if isinstance(result, BaseException):
                    raise Unavailable(
                        f"message broker did not confirm: {type(result).__name__}")

        self._run(_publish(), timeout=self.timeout * 3)

    def subscribe(self, queue: str, routing_keys: Sequence[str], handler: EventHandler) -> None:
        """Consume ``queue`` (declared and bound to ``routing_keys``) with ``handler``.

        Returns once consuming when the broker is reachable; otherwise consuming
        starts when it is.
        """
        self._add(queue, routing_keys, handler)

    def declare(self, queue: str, routing_keys: Sequence[str]) -> None:
        """Declare and bind ``queue`` without consuming: matching events wait in it.

        Declare a consumer's queue before its events are published (e.g. the
        indexer's queue in the ingest process), so none goes to ``unrouted``.
        Raises ``Unavailable`` when the broker cannot be reached.
        """
        self._add(queue, routing_keys, None)
        if not self._subscriptions[queue].ready.is_set():
            raise Unavailable(f"could not declare queue {queue!r}")

    def _add(self, queue: str, routing_keys: Sequence[str],
             handler: EventHandler | None) -> None:
        self._ensure_connector()

        async def _register() -> None:
            existing = self._subscriptions.get(queue)
            if existing is not None and existing.ready.is_set():
                if handler is None or existing.consumer_tag is not None:
                    existing.handler = handler or existing.handler
                    return
                existing.handler = handler
                assert existing.amqp_queue is not None
                existing.consumer_tag = await existing.amqp_queue.consume(
                    self._on_message_for(existing))
                return
            sub = _Subscription(queue, tuple(routing_keys), handler)
            self._subscriptions[queue] = sub
            if self._connected:
                await self._setup(sub)
            else:
                assert self._ready is not None
                with contextlib.suppress(TimeoutError):
                    # First use: wait for the connector, which sets everything up.
                    await asyncio.wait_for(self._ready.wait(), self.timeout)
                    await asyncio.wait_for(sub.ready.wait(), self.timeout)

        self._run(_register(), timeout=self.timeout * 3)

    def unsubscribe(self, queue: str) -> None:
        """Stop consuming ``queue``; it stays bound and keeps what is published."""

        async def _cancel() -> None:
            sub = self._subscriptions.get(queue)
            if sub is None or sub.amqp_queue is None or sub.consumer_tag is None:
                return
            tag, sub.consumer_tag, sub.handler = sub.consumer_tag, None, None
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, OSError):
                await sub.amqp_queue.cancel(tag)

        self._run(_cancel())

    def start(self) -> None:
        """Connect and consume; keeps trying in the background while the broker is away."""
        self._ensure_connector()

    def stop(self) -> None:
        """Stop consuming, let running handlers finish (and ack), then disconnect."""
        if self._stopped:
            return

        async def _close() -> None:
            for sub in self._subscriptions.values():
                if sub.amqp_queue is not None and sub.consumer_tag is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(sub.amqp_queue.cancel(sub.consumer_tag), 2)
                    sub.consumer_tag = None
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=self.timeout * 2)
            if self._connector is not None:
                self._connector.cancel()
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._connection.close(), self.timeout)
            # Whatever is left (a reconnect attempt, a consumer callback) ends here,
            # so the loop stops with nothing pending.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=2)

        try:
            self._run(_close(), timeout=self.timeout * 4)
        except Exception:  # noqa: BLE001 - stopping must not fail on a dead broker
            log.warning("message bus did not close cleanly")
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            # Finish what closing the transports scheduled, then release the loop.
            self._loop.run_until_complete(self._drain_loop())
            self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def _drain_loop() -> None:
        for _ in range(3):
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0)

    def _message_count(self, physical_name: str) -> int:
        async def _count() -> int:
            if not self._connected or self._connection is None:
                raise Unavailable("message broker not connected")
            channel = await self._connection.channel()
            try:
                q = await channel.declare_queue(physical_name, passive=True)
                return int(q.declaration_result.message_count or 0)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

        try:
            return self._run(_count())
        except (AMQPError, ChannelInvalidStateError, OSError) as exc:
            raise Unavailable(f"message broker: {type(exc).__name__}") from exc

    def message_count(self, queue: str) -> int:
        """Ready messages in subscriber queue ``queue`` (``Unavailable`` when away)."""
        return self._message_count(self.queue_name(queue))

    def dead_letter_count(self, queue: str) -> int:
        """Messages dead-lettered from ``queue``."""
        return self._message_count(f"{self.queue_name(queue)}.dlq")

    def unrouted_count(self) -> int:
        """Messages that matched no queue, kept in ``<namespace>.unrouted``."""
        return self._message_count(f"{self.namespace}.unrouted")

    def queue_depth(self) -> int:
        """Ready messages in the queues this bus subscribed or declared (0 when away)."""
        try:
            return sum(self.message_count(q) for q in list(self._subscriptions))
        except Unavailable:
            return 0  # a gauge: a scrape must not fail because the broker is away

    def check(self) -> None:
        self._ensure_connector()
        self._run(self._first_connection())
        if not self._connected:
            raise Unavailable("message broker not connected")

    def queues(self) -> list[str]:
        """Names of the queues this bus subscribed or declared."""
        return list(self._subscriptions)

    def delete_namespace(self, queues: Iterable[str] = ()) -> None:
        """Delete the namespace's exchanges, unrouted queue, and ``queues`` plus this
        bus's own queues (with their DLQs). For tests and decommissioning."""

        self._ensure_connector()

        async def _delete() -> None:
            await self._first_connection()
            if not self._connected or self._connection is None:
                raise Unavailable("message broker not connected")
            channel = await self._connection.channel()
            try:
                for queue in {*self._subscriptions, *queues}:
                    name = self.queue_name(queue)
                    for q in (name, f"{name}.dlq"):
                        await channel.queue_delete(q)
                exchanges = [self.namespace, f"{self.namespace}.dlx"]
                if self.keep_unrouted:
                    await channel.queue_delete(f"{self.namespace}.unrouted")
                    exchanges.append(f"{self.namespace}.unrouted")
                for ex in exchanges:
                    await channel.exchange_delete(ex)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

        self._run(_delete())
