from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from vna.adapters.blob.filesystem import FilesystemBlobStore
from vna.adapters.blob.memory import MemoryBlobStore
from vna.adapters.bus.local import LocalBus
from vna.adapters.index.sqlalchemy import SqlIndex
from vna.usecases.index import index_instance
from vna.usecases.relay import OutboxRelay


class Core:
    """The core wired on embedded adapters, with the relay driven by the test."""

    def __init__(self, tmp: Path, blobs: MemoryBlobStore | FilesystemBlobStore) -> None:
        self.tmp = tmp
        self.blobs = blobs
        self.index = SqlIndex.from_url(f"sqlite:///{tmp / 'index.sqlite'}")
        self.bus = LocalBus()
        self.bus.subscribe("vna.index", ["instance.stored"],
                           partial(index_instance, blobs=self.blobs, index=self.index))
        self.relay = OutboxRelay(index=self.index, bus=self.bus)
        self.staging = tmp / "staging"
        self.staging.mkdir()

    def drain(self) -> None:
        while self.relay.drain_once():
            pass


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    c = Core(tmp_path, MemoryBlobStore())
    yield c
    c.index.close()


@pytest.fixture
def fs_core(tmp_path: Path) -> Iterator[Core]:
    c = Core(tmp_path, FilesystemBlobStore(tmp_path / "blobs"))
    yield c
    c.index.close()
