"""Online backfill of extended query attributes for instances already indexed.

When ``VNA_EXTRA_QUERY_ATTRIBUTES`` gains an attribute, the indexer writes its
values for every new instance; this fills them in for the instances indexed
before, from the DICOM JSON the index already keeps for each instance (no blob
is read, let alone pixel data). It works in batches of short transactions in
instance pk order and records its progress with each batch, so the archive
keeps serving meanwhile and a stopped backfill resumes where it was. Writing a
value twice changes nothing, so it may overlap the indexer or another backfill.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vna import metrics
from vna.dicom.extended import ExtendedAttribute, ExtendedAttributes, ExtraValue, values_of
from vna.ports import Index

log = logging.getLogger("vna.backfill")

BATCH_SIZE = 500


@dataclass
class BackfillReport:
    attributes: list[str] = field(default_factory=list)
    """Keys of the attributes this run backfilled (completed unless stopped)."""
    instances: int = 0
    values: int = 0
    forgotten: list[str] = field(default_factory=list)
    completed: bool = True


def pending_attributes(extended: ExtendedAttributes, *, index: Index) -> list[ExtendedAttribute]:
    """The configured attributes whose backfill has not completed."""
    states = index.extended_progress()
    return [a for a in extended
            if not ((s := states.get(a.progress_key)) is not None and s.completed)]


def backfill_extended(extended: ExtendedAttributes, *, index: Index,
                      batch_size: int = BATCH_SIZE,
                      should_stop: Callable[[], bool] = lambda: False,
                      on_batch: Callable[[int], None] | None = None) -> BackfillReport:
    """Backfill every configured attribute not completed yet; resumable.

    ``should_stop`` is asked between batches; ``on_batch`` is told the last
    instance pk of each batch written (progress reports, tests).
    """
    report = BackfillReport()
    report.forgotten = index.extended_forget({a.progress_key for a in extended})
    states = index.extended_progress()
    pending = pending_attributes(extended, index=index)
    report.attributes = [a.key for a in pending]
    for attr in extended:
        metrics.EXTENDED_BACKFILL_PENDING.labels(attribute=attr.key).set(
            1 if attr in pending else 0)
    if not pending:
        return report
    last = {a.progress_key: (s.last_instance_pk if (s := states.get(a.progress_key)) else 0)
            for a in pending}
    after = min(last.values())
    log.info("backfill of extended query attributes", extra={
        "attributes": report.attributes, "from_instance_pk": after})
    while True:
        if should_stop():
            report.completed = False
            return report
        rows = index.extended_scan(after, batch_size)
        if not rows:
            break
        values: list[tuple[int, ExtraValue]] = []
        for row in rows:
            wanted = [a for a in pending if row.instance_pk > last[a.progress_key]]
            if not wanted:
                continue
            metadata = json.loads(row.metadata_json)
            for attr in wanted:
                values += [(row.owners[v.level], v) for v in values_of(attr, metadata)]
        after = rows[-1].instance_pk
        for key in last:
            last[key] = max(last[key], after)
        index.extended_write(values, last, set())
        report.instances += len(rows)
        report.values += len(values)
        metrics.EXTENDED_BACKFILLED.inc(len(rows))
        if on_batch is not None:
            on_batch(after)
    # Nothing left after ``after``: instances indexed from now on get their
    # values from the indexer (which has this configuration).
    index.extended_write([], last, set(last))
    for attr in pending:
        metrics.EXTENDED_BACKFILL_PENDING.labels(attribute=attr.key).set(0)
    log.info("backfill completed", extra={"attributes": report.attributes,
                                          "instances": report.instances,
                                          "values": report.values})
    return report


class BackgroundBackfill:
    """``backfill_extended`` in a daemon thread, started with the indexer."""

    def __init__(self, extended: ExtendedAttributes, *, index: Index) -> None:
        self.extended = extended
        self.index = index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.report: BackfillReport | None = None

    def start(self) -> None:
        if not self.extended:
            return
        self._thread = threading.Thread(target=self._run, name="backfill", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.report = backfill_extended(self.extended, index=self.index,
                                                should_stop=self._stop.is_set)
                return
            except Exception:
                # The index may be away for a while: try again, it resumes.
                log.exception("backfill interrupted; retrying")
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the backfill has ended; True when it completed."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        return not self.extended or (self.report is not None and self.report.completed)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
