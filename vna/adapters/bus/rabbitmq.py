"""RabbitMQ bus (aio-pika): the only module that imports it.

The core is thread-based (pynetdicom, SQLAlchemy), so aio-pika runs on an
event loop of its own in a background thread and the ``Bus`` methods bridge to
it. Durable topic exchange, quorum queues with a delivery limit and a
dead-letter queue, persistent messages, publisher confirms with mandatory
routing, manual acks after the handler returned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from vna.events import decode_event
from vna.ports import EventHandler, Unavailable

log = logging.getLogger("vna.bus")
T = TypeVar("T")

DELIVERY_LIMIT = 5
UNROUTED_MAX = 100_000


class RabbitBus:
    def __init__(self, url: str, *, namespace: str = "vna", prefetch: int = 64,
                 timeout: float = 5.0) -> None:
        self.url = url
        self.namespace = namespace
        self.prefetch = prefetch
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqp",
                                        daemon=True)
        self._thread.start()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._subscriptions: list[tuple[str, tuple[str, ...], EventHandler]] = []
        self._consuming: set[str] = set()
        self._lock = asyncio.Lock()
        self._stopped = False
        self._retry: Future[None] | None = None

    # ------------------------------------------------------------ plumbing
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self.timeout * 2)
        except TimeoutError as exc:
            future.cancel()
            raise Unavailable("message broker did not answer in time") from exc

    def _queue_name(self, queue: str) -> str:
        return f"{self.namespace}:{queue}"

    async def _connect(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is not None and self._connection is not None \
                    and not self._connection.is_closed:
                return self._exchange
            try:
                self._connection = await asyncio.wait_for(
                    aio_pika.connect_robust(self.url, timeout=self.timeout), self.timeout)
                channel = await self._connection.channel(publisher_confirms=True)
                self._channel = channel  # type: ignore[assignment]
                unrouted = await channel.declare_exchange(
                    f"{self.namespace}.unrouted", aio_pika.ExchangeType.FANOUT, durable=True)
                # Events nobody subscribes to yet (e.g. instance.indexed before a
                # replicator exists) land here, so mandatory publishing still
                # proves that the broker has every message.
                keep = await channel.declare_queue(
                    f"{self.namespace}.unrouted", durable=True,
                    arguments={"x-max-length": UNROUTED_MAX, "x-overflow": "drop-head"})
                await keep.bind(unrouted)
                await channel.declare_exchange(f"{self.namespace}.dlx",
                                               aio_pika.ExchangeType.DIRECT, durable=True)
                self._exchange = await channel.declare_exchange(
                    self.namespace, aio_pika.ExchangeType.TOPIC, durable=True,
                    arguments={"alternate-exchange": f"{self.namespace}.unrouted"})
            except Exception as exc:
                self._exchange = None
                if self._connection is not None:
                    await self._connection.close()
                    self._connection = None
                raise Unavailable(f"message broker: {exc}") from exc
            for queue, keys, handler in self._subscriptions:
                await self._consume(queue, keys, handler)
            return self._exchange

    async def _consume(self, queue: str, routing_keys: tuple[str, ...],
                       handler: EventHandler) -> None:
        if queue in self._consuming or self._connection is None:
            return
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        name = self._queue_name(queue)
        dlx = await channel.get_exchange(f"{self.namespace}.dlx")
        dlq = await channel.declare_queue(f"{name}.dlq", durable=True,
                                          arguments={"x-queue-type": "quorum"})
        await dlq.bind(dlx, routing_key=name)
        q = await channel.declare_queue(name, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": f"{self.namespace}.dlx",
            "x-dead-letter-routing-key": name,
        })
        exchange = await channel.get_exchange(self.namespace)
        for key in routing_keys:
            await q.bind(exchange, routing_key=key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                event = decode_event(message.body)
            except ValueError:
                log.error("undecodable message dead-lettered", extra={"queue": name})
                await message.reject(requeue=False)
                return
            try:
                # Handlers are synchronous (database writes): keep them off the loop.
                await self._loop.run_in_executor(None, handler, event)
            except Exception:
                log.exception("handler failed; message requeued", extra={"queue": name})
                await message.nack(requeue=True)
                return
            await message.ack()

        await q.consume(on_message)
        self._consuming.add(queue)

    # ------------------------------------------------------------ Bus
    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if not messages:
            return

        async def _publish() -> None:
            exchange = await self._connect()
            publishes = [
                exchange.publish(
                    aio_pika.Message(body=payload, content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=routing_key, mandatory=True, timeout=self.timeout)
                for routing_key, payload in messages
            ]
            try:
                await asyncio.wait_for(asyncio.gather(*publishes), self.timeout * 2)
            except Exception as exc:
                raise Unavailable(f"message broker did not confirm: {exc}") from exc

        self._run(_publish(), timeout=self.timeout * 3)

    def subscribe(self, queue: str, routing_keys: Sequence[str], handler: EventHandler) -> None:
        self._subscriptions.append((queue, tuple(routing_keys), handler))

    def start(self) -> None:
        """Connect and consume; keeps retrying in the background while the broker is away."""

        async def _keep_trying() -> None:
            delay = 0.5
            while not self._stopped:
                try:
                    await self._connect()
                    return
                except Unavailable as exc:
                    log.warning("waiting for the message broker: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)

        self._retry = asyncio.run_coroutine_threadsafe(_keep_trying(), self._loop)

    def stop(self) -> None:
        self._stopped = True

        async def _close() -> None:
            if self._connection is not None:
                await self._connection.close()

        try:
            self._run(_close())
        except Exception:  # noqa: BLE001 - stopping must not fail on a dead broker
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def queue_depth(self) -> int:
        async def _depth() -> int:
            if self._connection is None or self._connection.is_closed:
                return 0
            channel = await self._connection.channel()
            total = 0
            try:
                for queue in self._consuming:
                    q = await channel.declare_queue(self._queue_name(queue), passive=True)
                    total += q.declaration_result.message_count or 0
            finally:
                await channel.close()
            return total

        try:
            return self._run(_depth())
        except Exception:  # noqa: BLE001 - a gauge, not a reason to fail a scrape
            return 0

    def check(self) -> None:
        if self._connection is None or self._connection.is_closed:
            raise Unavailable("message broker not connected")
