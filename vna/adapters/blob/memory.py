"""Blobs in a dict: for unit tests (not durable)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vna.model import BlobKey
from vna.ports import Unavailable


class MemoryBlobStore:
    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.available = True
        """Tests flip this to simulate an unreachable store."""

    def put_file(self, key: BlobKey, path: Path) -> bool:
        if not self.available:
            raise Unavailable("memory blob store switched off")
        data = path.read_bytes()
        with self._lock:
            if key in self._blobs:
                return False
            self._blobs[key] = data
            return True

    def exists(self, key: BlobKey) -> bool:
        return key in self._blobs

    def open(self, key: BlobKey) -> BinaryIO:
        return io.BytesIO(self._blobs[key])

    def read_range(self, key: BlobKey, start: int, length: int | None = None) -> bytes:
        data = self._blobs[key]
        return data[start:] if length is None else data[start : start + length]

    def size(self, key: BlobKey) -> int:
        return len(self._blobs[key])

    def local_path(self, key: BlobKey) -> Path | None:
        return None

    def local_file(self, key: BlobKey) -> tuple[str, int] | None:
        return None

    def keys(self) -> Iterator[BlobKey]:
        yield from (BlobKey(k) for k in list(self._blobs))

    def check(self) -> None:
        if not self.available:
            raise Unavailable("memory blob store switched off")
