"""The archive in-process on embedded defaults, for integration tests.

``Archive`` starts what ``vna run`` starts minus HTTP — the DIMSE AE with
every registered service (Q/R, worklist when present), the outbox relay and
the indexer — on free ports under a temporary data directory, and stops them.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from pynetdicom.transport import AssociationServer

from tests.support.processes import free_port, wait_for
from vna.bootstrap import Deps, build
from vna.cli import _registrars, start_backfill, subscribe_indexer
from vna.config import Settings
from vna.usecases.backfill import BackgroundBackfill
from vna.usecases.relay import OutboxRelay


class Archive:
    """``with Archive(tmp_path, peers=...) as archive:`` — DIMSE on ``archive.port``."""

    def __init__(self, data_dir: Path, *, peers: str = "", ae_title: str = "VNA",
                 backfill: bool = True, **overrides: Any) -> None:
        # Explicit embedded URLs: the environment of the test run must not
        # switch the archive to another backend behind the test's back.
        values: dict[str, Any] = {
            "data_dir": data_dir, "dimse_port": free_port(), "http_port": free_port(),
            "ae_title": ae_title, "peers": peers, "storage_url": "", "index_url": "",
            "bus_url": "local://", "redis_url": "", "log_format": "text", **overrides,
        }
        self.settings = Settings(**values)
        self.start_backfill = backfill
        """As ``vna run``: backfill extended query attributes in the background."""
        self.backfill: BackgroundBackfill | None = None
        self.deps: Deps | None = None
        self._relay: OutboxRelay | None = None
        self._server: AssociationServer | None = None

    @property
    def port(self) -> int:
        return self.settings.dimse_port

    @property
    def ae_title(self) -> str:
        return self.settings.ae_title

    def start(self) -> Archive:
        deps = build(self.settings)
        self.deps = deps
        subscribe_indexer(deps)
        deps.bus.start()
        self._relay = OutboxRelay(index=deps.index, bus=deps.bus)
        self._relay.start()
        from services.ingest.scp import start_dimse

        self._server = start_dimse(deps, on_stored=self._relay.wake, registrars=_registrars())
        if self.start_backfill:
            self.backfill = start_backfill(deps)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # also closes the listening socket
            self._server = None
        if self.backfill is not None:
            self.backfill.stop()
            self.backfill = None
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self.deps is not None:
            self.deps.close()
            self.deps = None

    def wait_indexed(self, instances: int, timeout: float = 60.0) -> None:
        """Block until ``instances`` are indexed and no claim waits for the indexer."""
        assert self.deps is not None
        index = self.deps.index

        def done() -> bool:
            counts = index.counts()
            return counts["unindexed"] == 0 and counts["instances"] >= instances

        wait_for(done, timeout, 0.05, f"{instances} instances to be indexed")

    def __enter__(self) -> Archive:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
