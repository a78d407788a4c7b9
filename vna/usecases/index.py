"""The indexer: ``instance.stored`` in, index rows and ``instance.indexed`` out."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from vna import metrics
from vna.dicom.header import extract_record, read_dataset
from vna.events import Event, InstanceIndexed, InstanceStored
from vna.model import BlobKey
from vna.ports import BlobStore, Index

log = logging.getLogger("vna.index")


def index_instance(event: Event, *, blobs: BlobStore, index: Index) -> bool:
    """Index the instance ``event`` announces. Redelivery adds nothing (True if added)."""
    if not isinstance(event, InstanceStored):
        return False
    record = _read_record(event.blob_key, blobs, event.transfer_syntax_uid, event.size)
    indexed = InstanceIndexed(
        sop_instance_uid=event.sop_instance_uid,
        study_instance_uid=event.study_instance_uid,
        series_instance_uid=event.series_instance_uid,
        blob_key=event.blob_key,
        stored_event_id=event.event_id,
        stored_at=event.occurred_at,
    )
    added = index.upsert_instance(record, indexed)
    if added:
        metrics.INSTANCES_INDEXED.inc()
    return added


def _read_record(key: BlobKey, blobs: BlobStore, ts: str, size: int):  # type: ignore[no-untyped-def]
    local = blobs.local_path(key)
    if local is not None:
        with open(local, "rb") as fp:
            ds = read_dataset(fp)
            return extract_record(ds, blob_key=key, size=size, transfer_syntax_uid=ts)
    # Remote store: a seekable local copy, so that bulk data is skipped, not parsed.
    with tempfile.TemporaryFile() as tmp:
        with blobs.open(key) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
        ds = read_dataset(tmp)
        return extract_record(ds, blob_key=key, size=size, transfer_syntax_uid=ts)


def read_blob_record(key: BlobKey, blobs: BlobStore):  # type: ignore[no-untyped-def]
    """The index record and claim keys of any stored blob (used by reindex)."""
    local: Path | None = blobs.local_path(key)
    size = blobs.size(key)
    if local is not None:
        with open(local, "rb") as fp:
            ds = read_dataset(fp)
            ts = str(ds.file_meta.TransferSyntaxUID)
            return ds, extract_record(ds, blob_key=key, size=size, transfer_syntax_uid=ts)
    with tempfile.TemporaryFile() as tmp:
        with blobs.open(key) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
        ds = read_dataset(tmp)
        ts = str(ds.file_meta.TransferSyntaxUID)
        return ds, extract_record(ds, blob_key=key, size=size, transfer_syntax_uid=ts)
