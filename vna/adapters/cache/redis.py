"""Redis cache and cross-process locks (redis-py)."""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import RedisError

from vna.ports import Unavailable


class RedisCache:
    def __init__(self, url: str, *, prefix: str = "vna:") -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        self.prefix = prefix

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.prefix + key)
        except RedisError:
            return None  # a cache that is away is a miss, not an error
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        try:
            self.client.set(self.prefix + key, value, px=int(ttl * 1000) if ttl else None)
        except RedisError:
            pass

    def delete(self, key: str) -> None:
        try:
            self.client.delete(self.prefix + key)
        except RedisError:
            pass

    def lock(self, name: str, timeout: float = 30.0) -> Any:
        return self.client.lock(self.prefix + "lock:" + name, timeout=timeout,
                                blocking_timeout=timeout)

    def check(self) -> None:
        try:
            self.client.ping()
        except RedisError as exc:
            raise Unavailable(f"redis: {exc}") from exc
