"""Build the adapters the settings name: ``build(settings) -> Deps``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vna.config import Settings
from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes, parse_extended_attributes
from vna.ports import BlobStore, Bus, Cache, Index


@dataclass
class Deps:
    """Everything a service hands to the use cases."""

    settings: Settings
    blobs: BlobStore
    index: Index
    bus: Bus
    cache: Cache
    extras: dict[str, Any] = field(default_factory=dict)
    """Optional ports added by other services (e.g. 'worklist')."""
    extended: ExtendedAttributes = NO_EXTENDED
    """The extended query attributes (``VNA_EXTRA_QUERY_ATTRIBUTES``)."""
    _staging: Path | None = field(default=None, init=False, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)

    def staging_dir(self) -> Path:
        """Where C-STORE and STOW-RS frame incoming data sets: beside the blobs when
        they are files (a link, not a copy, then makes them durable). Made once."""
        if self._staging is None:
            root = getattr(self.blobs, "staging_dir", None)
            path: Path = root() if callable(root) else self.settings.data_dir / "tmp"
            path.mkdir(parents=True, exist_ok=True)
            self._staging = path
        return self._staging

    def on_close(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` (a background thread's) first when these are closed."""
        self._closers.append(stop)

    def close(self) -> None:
        for stop in reversed(self._closers):
            stop()
        self._closers.clear()
        self.bus.stop()
        self.index.close()


def build_blobs(settings: Settings) -> BlobStore:
    url = settings.blob_url()
    scheme = urlparse(url).scheme
    if scheme == "file":
        from vna.adapters.blob.filesystem import FilesystemBlobStore

        return FilesystemBlobStore.from_url(url)
    if scheme == "s3":
        from vna.adapters.blob.s3 import S3BlobStore

        return S3BlobStore.from_url(
            url,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
        )
    if scheme == "memory":
        from vna.adapters.blob.memory import MemoryBlobStore

        return MemoryBlobStore()
    raise ValueError(f"VNA_STORAGE_URL: unsupported scheme {scheme!r}")


def build_index(settings: Settings, blobs: BlobStore | None = None) -> Index:
    """The index; with ``blobs``, corrections and merges are journaled there so that
    ``vna reindex`` can rebuild them (every process that can correct gets them)."""
    from vna.adapters.index.sqlalchemy import SqlIndex
    from vna.journal import BlobJournal

    journal = BlobJournal(blobs) if blobs is not None else None
    return SqlIndex.from_url(settings.db_url(), journal=journal)


def build_bus(settings: Settings) -> Bus:
    scheme = urlparse(settings.bus_url).scheme
    if scheme == "local":
        from vna.adapters.bus.local import LocalBus

        return LocalBus()
    if scheme in ("amqp", "amqps"):
        from vna.adapters.bus.rabbitmq import RabbitBus

        return RabbitBus(settings.bus_url, namespace=settings.bus_namespace)
    raise ValueError(f"VNA_BUS_URL: unsupported scheme {scheme!r}")


def build_cache(settings: Settings) -> Cache:
    if settings.redis_url:
        from vna.adapters.cache.redis import RedisCache

        return RedisCache(settings.redis_url, prefix=f"{settings.bus_namespace}:")
    from vna.adapters.cache.memory import MemoryCache

    return MemoryCache()


def build(settings: Settings) -> Deps:
    # A wrong attribute list stops the start with the reason, before anything opens.
    extended = parse_extended_attributes(settings.extra_query_attributes)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = build_blobs(settings)
    return Deps(
        settings=settings,
        blobs=blobs,
        index=build_index(settings, blobs),
        bus=build_bus(settings),
        cache=build_cache(settings),
        extended=extended,
    )
