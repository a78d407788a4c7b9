"""In-process cache and locks (embedded mode, unit tests)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any


class MemoryCache:
    def __init__(self, max_items: int = 10_000) -> None:
        self._items: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.max_items = max_items

    def get(self, key: str) -> bytes | None:
        with self._guard:
            item = self._items.get(key)
            if item is None:
                return None
            value, expires = item
            if expires is not None and expires <= time.monotonic():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with self._guard:
            self._items[key] = (value, time.monotonic() + ttl if ttl else None)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._guard:
            self._items.pop(key, None)

    def lock(self, name: str, timeout: float = 30.0) -> Any:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        return lock

    def check(self) -> None:
        return None
