"""The indexer: ``instance.stored`` in, index rows and ``instance.indexed`` out."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import BinaryIO

from pydicom.dataset import Dataset

from vna import metrics
from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.header import extract_record, read_dataset
from vna.events import Event, InstanceIndexed, InstanceStored
from vna.model import BlobKey
from vna.ports import BlobStore, Index, IndexRecord, RecordRefused

log = logging.getLogger("vna.index")


def index_instance(event: Event, *, blobs: BlobStore, index: Index,
                   extended: ExtendedAttributes = NO_EXTENDED) -> bool:
    """Index the instance ``event`` announces. Redelivery adds nothing (True if added)."""
    return any(index_instances([event], blobs=blobs, index=index, extended=extended))


def index_isolating(events: Sequence[Event], *, blobs: BlobStore, index: Index,
                    extended: ExtendedAttributes = NO_EXTENDED) -> None:
    """``index_instances``, and when the index refuses the batch, each instance
    alone: one it cannot hold is logged, counted and audited, and does not hold up
    the others (retried, the batch would fail again and again, and every instance
    in it, or behind it in the outbox, would wait for ever)."""
    try:
        index_instances(events, blobs=blobs, index=index, extended=extended)
        return
    except RecordRefused as exc:
        if len(events) == 1:
            _refused(events[0], exc, index)
            return
    for event in events:
        try:
            index_instances([event], blobs=blobs, index=index, extended=extended)
        except RecordRefused as exc:
            _refused(event, exc, index)


def _refused(event: Event, exc: RecordRefused, index: Index) -> None:
    uid = getattr(event, "sop_instance_uid", "")
    log.error("instance stored but not indexed: %s", exc,
              extra={"sop_instance_uid": uid, "blob_key": getattr(event, "blob_key", "")})
    metrics.INDEX_REFUSED.inc()
    try:
        index.record_audit("index", "refused", subject=uid,
                           detail=json.dumps({"reason": str(exc)[:500]}))
    except Exception:
        log.exception("audit record could not be written")


def index_instances(events: Sequence[Event], *, blobs: BlobStore, index: Index,
                    extended: ExtendedAttributes = NO_EXTENDED) -> list[bool]:
    """Index a batch of ``instance.stored`` events in one transaction (one flag each;
    other events are skipped). The record comes with the event when the store path
    extracted it; otherwise it is read from the blob's header. The values of the
    configured ``extended`` query attributes are written with the instances' rows."""
    items: list[tuple[IndexRecord, Event | None]] = []
    for event in events:
        if not isinstance(event, InstanceStored):
            continue
        if event.record is not None:
            record = event.record
            if extended:
                # The indexer's configuration decides, from the DICOM JSON as the
                # backfill does, whatever the store path was configured with.
                record = replace(record, extended=extended.values(
                    json.loads(record.metadata_json)))
        else:
            record = read_blob_record(event.blob_key, blobs, event.size,
                                      extended=extended)[1]
        items.append((record, InstanceIndexed(
            sop_instance_uid=event.sop_instance_uid,
            study_instance_uid=event.study_instance_uid,
            series_instance_uid=event.series_instance_uid,
            blob_key=event.blob_key,
            stored_event_id=event.event_id,
            stored_at=event.occurred_at,
            patient_id=record.patient.get("PatientID") or "",
            issuer_of_patient_id=record.patient.get("IssuerOfPatientID") or "",
            accession_number=record.study.get("AccessionNumber") or "",
        )))
    added = index.upsert_instances(items)
    metrics.INSTANCES_INDEXED.inc(sum(added))
    return added


@contextmanager
def seekable_blob(key: BlobKey, blobs: BlobStore) -> Iterator[BinaryIO]:
    """The blob as a seekable file: its own path, or a local copy of a remote one,
    so that the parser can skip bulk data instead of reading through it."""
    local = blobs.local_path(key)
    if local is not None:
        with open(local, "rb") as fp:
            yield fp
        return
    with tempfile.TemporaryFile() as tmp:
        with blobs.open(key) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
        yield tmp


def read_blob_record(key: BlobKey, blobs: BlobStore, size: int | None = None, *,
                     extended: ExtendedAttributes = NO_EXTENDED
                     ) -> tuple[Dataset, IndexRecord]:
    """The parsed header and the index record of a stored blob (indexer and reindex)."""
    with seekable_blob(key, blobs) as fp:
        # Extract while the file is open: deferred values must stay readable.
        ds = read_dataset(fp)
        ts = str(ds.file_meta.TransferSyntaxUID)
        record = extract_record(ds, blob_key=key,
                                size=blobs.size(key) if size is None else size,
                                transfer_syntax_uid=ts, extended=extended)
    return ds, record
