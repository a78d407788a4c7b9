"""In-process bus for the embedded world.

Durability comes from the outbox: the relay removes an outbox entry only
after ``publish`` returned, and ``publish`` returns only after every bound
queue's handler has processed the event. A handler failure makes ``publish``
raise, so the entry stays in the outbox and is delivered again later
(consumers are idempotent).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from vna.events import Event, decode_event
from vna.ports import BatchHandler, EventHandler, Unavailable

log = logging.getLogger(__name__)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` one word, ``#`` zero or more words."""
    return _topic_regex(pattern).fullmatch(routing_key) is not None


@functools.lru_cache(maxsize=256)
def _topic_regex(pattern: str) -> re.Pattern[str]:
    # Once per pattern: escaping and rewriting it cost 10 us for every event and queue.
    return re.compile(
        re.escape(pattern)
        .replace(r"\#", "__HASH__")
        .replace(r"\*", "[^.]+")
        .replace(r"\.__HASH__", r"(\..+)?")
        .replace(r"__HASH__\.", r"(.+\.)?")
        .replace("__HASH__", ".*")
    )


@dataclass
class _Queue:
    name: str
    routing_keys: tuple[str, ...]
    handler: EventHandler | None
    pending: deque[Event] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalBus:
    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._guard = threading.Lock()
        self.running = False

    def subscribe(self, queue: str, routing_keys: Sequence[str], handler: EventHandler) -> None:
        with self._guard:
            existing = self._queues.get(queue)
            if existing is None:
                self._queues[queue] = _Queue(queue, tuple(routing_keys), handler)
            else:
                existing.routing_keys = tuple(routing_keys)
                existing.handler = handler
        self._drain(self._queues[queue])

    def unsubscribe(self, queue: str) -> None:
        """Stop consuming; the queue keeps what is published meanwhile."""
        with self._guard:
            if queue in self._queues:
                self._queues[queue].handler = None

    def declare(self, queue: str, routing_keys: Sequence[str]) -> None:
        """Bind a queue with no consumer yet (messages wait in it)."""
        with self._guard:
            self._queues.setdefault(queue, _Queue(queue, tuple(routing_keys), None))

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        targets: list[_Queue] = []
        for routing_key, payload in messages:
            bound = [
                q
                for q in list(self._queues.values())
                if any(topic_matches(p, routing_key) for p in q.routing_keys)
            ]
            if not bound:
                # Nobody consumes this kind of event in this process: nothing to keep,
                # and nothing to decode.
                continue
            event = decode_event(payload)
            for q in bound:
                with q.lock:
                    q.pending.append(event)
                if q not in targets:
                    targets.append(q)
        for q in targets:
            self._drain(q)

    def _drain(self, q: _Queue) -> None:
        with q.lock:
            while q.pending and q.handler is not None:
                handler = q.handler
                size = handler.max_batch if isinstance(handler, BatchHandler) else 1
                batch = [q.pending[i] for i in range(min(size, len(q.pending)))]
                try:
                    if isinstance(handler, BatchHandler):
                        handler.handle(batch)
                    else:
                        handler(batch[0])
                except Exception as exc:
                    # Dropped here; the outbox still holds them and will publish again.
                    for _ in batch:
                        q.pending.popleft()
                    raise Unavailable(f"{q.name}: handler failed: {exc}") from exc
                for _ in batch:
                    q.pending.popleft()

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def queue_depth(self) -> int:
        return sum(len(q.pending) for q in self._queues.values())

    def check(self) -> None:
        return None
