"""Rebuild the index from the blob store alone (design invariant 7)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.part10 import read_header
from vna.model import InstanceClaim
from vna.ports import BlobStore, ConflictError, Index
from vna.usecases.index import read_blob_record
from vna.usecases.store import stored_event

log = logging.getLogger("vna.reindex")


@dataclass
class ReindexReport:
    blobs: int = 0
    indexed: int = 0
    failed: int = 0


def reindex(*, blobs: BlobStore, index: Index,
            extended: ExtendedAttributes = NO_EXTENDED) -> ReindexReport:
    """Claim and index every blob; existing rows are kept (idempotent)."""
    import hashlib

    report = ReindexReport()
    for key in blobs.keys():
        report.blobs += 1
        try:
            ds, record = read_blob_record(key, blobs, extended=extended)
            with blobs.open(key) as fp:
                header = read_header(fp)
                digest = hashlib.sha256()
                while chunk := fp.read(1 << 20):
                    digest.update(chunk)
            claim = InstanceClaim(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                patient_id=str(ds.get("PatientID", "") or ""),
                issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
                transfer_syntax_uid=header.transfer_syntax_uid, blob_key=key,
                dataset_sha256=digest.hexdigest(), size=record.size,
            )
            try:
                index.claim(claim, stored_event(claim, "reindex"))
            except ConflictError as exc:
                log.warning("reindex: %s", exc.reason, extra={"blob_key": key})
            if index.upsert_instance(record):
                report.indexed += 1
        except Exception:
            report.failed += 1
            log.exception("reindex: blob unreadable", extra={"blob_key": key})
    return report
