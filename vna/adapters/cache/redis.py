"""Redis cache and cross-process locks (redis-py)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import redis
from redis.exceptions import RedisError

from vna.ports import Unavailable


class RedisCache:
    """``Cache`` on Redis. Keys are prefixed so several archives can share one server.

    A cache that cannot be reached behaves as empty (get misses, set and delete
    do nothing): callers fall back to the source of truth. ``check`` and
    ``lock`` do raise, because readiness and mutual exclusion must not pretend.
    """

    def __init__(self, url: str, *, prefix: str = "vna:", connect_timeout: float = 3.0,
                 socket_timeout: float = 5.0) -> None:
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
            health_check_interval=30)
        self.prefix = prefix

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.prefix + key)
        except RedisError:
            return None  # a cache that is away is a miss, not an error
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        # Milliseconds, rounded up: a tiny TTL must still expire, not be refused.
        px = max(1, math.ceil(ttl * 1000)) if ttl else None
        with contextlib.suppress(RedisError):
            self.client.set(self.prefix + key, value, px=px)

    def delete(self, key: str) -> None:
        with contextlib.suppress(RedisError):
            self.client.delete(self.prefix + key)

    def lock(self, name: str, timeout: float = 30.0) -> Any:
        """A redis-py ``Lock``: a context manager, also ``acquire(blocking=False)``.

        ``timeout`` is the lease: a holder that dies frees the lock after it.
        Entering waits at most ``timeout`` too, then raises ``LockError``.
        """
        return self.client.lock(self.prefix + "lock:" + name, timeout=timeout,
                                blocking_timeout=timeout)

    def check(self) -> None:
        try:
            self.client.ping()
        except RedisError as exc:
            raise Unavailable(f"redis: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.client.close()
