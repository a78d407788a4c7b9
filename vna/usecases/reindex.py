"""Rebuild the index from the blob store alone (design invariant 7).

The blob store holds the instances as received and the correction journal
(``vna.journal``): study corrections, patient merges and unmerges. Reindex
indexes every instance first, then replays the journal's committed entries in
their original order, so that queries, metadata versions and merge records
come out as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.part10 import read_header
from vna.journal import MAGIC, JournalEntry, JournalError, committed_chain, decode, is_journal
from vna.model import BlobKey, InstanceClaim
from vna.ports import BlobStore, ConflictError, Index
from vna.usecases.index import read_blob_record
from vna.usecases.store import stored_event

log = logging.getLogger("vna.reindex")


@dataclass
class ReindexReport:
    blobs: int = 0
    indexed: int = 0
    failed: int = 0
    journal: int = 0
    """Journal entries found in the blob store."""
    replayed: int = 0
    """Journal entries applied now (those the index held already are skipped)."""
    orphaned: int = 0
    """Journal entries left out: their transaction did not commit (``committed_chain``)."""
    mismatched: list[str] = field(default_factory=list)
    """Replayed entries whose outcome differed from what they recorded: key and how."""


def reindex(*, blobs: BlobStore, index: Index,
            extended: ExtendedAttributes = NO_EXTENDED) -> ReindexReport:
    """Claim and index every blob, then replay the correction journal; existing
    rows and journal entries already applied are kept (idempotent)."""
    report = ReindexReport()
    entries: list[JournalEntry] = []
    for key in blobs.keys():
        report.blobs += 1
        try:
            if is_journal(blobs.read_range(key, 0, len(MAGIC))):
                with blobs.open(key) as fp:
                    entries.append(decode(key, fp.read()))
                continue
            if _index_blob(key, blobs=blobs, index=index, extended=extended):
                report.indexed += 1
        except JournalError:
            report.failed += 1
            log.exception("reindex: journal entry unreadable", extra={"blob_key": key})
        except Exception:
            report.failed += 1
            log.exception("reindex: blob unreadable", extra={"blob_key": key})
    report.journal = len(entries)
    replay_journal(entries, index=index, report=report)
    outcome = "success" if not (report.failed or report.mismatched) else "incomplete"
    index.record_audit(
        "index.reindexed", outcome, actor="reindex", subject="index",
        detail=f"blobs={report.blobs} indexed={report.indexed} failed={report.failed} "
               f"journal={report.journal} replayed={report.replayed} "
               f"orphaned={report.orphaned} mismatched={len(report.mismatched)}")
    return report


def replay_journal(entries: list[JournalEntry], *, index: Index,
                   report: ReindexReport) -> None:
    """Apply the committed journal entries the index does not hold yet, in order."""
    chain, orphans = committed_chain(entries)
    report.orphaned += len(orphans)
    for orphan in orphans:
        log.warning("reindex: journal entry %s (%s, seq %d) was not committed; left out",
                    orphan.key, orphan.kind, orphan.seq)
    if chain:
        log.info("reindex: the last journal entry %s (%s) is replayed; whether its "
                 "transaction committed cannot be told from the blobs", chain[-1].key,
                 chain[-1].kind)
    held = index.journal_keys()
    for entry in chain:
        if entry.key in held:
            continue
        differs = index.replay_journal(entry)
        report.replayed += 1
        if differs:
            report.mismatched.append(f"{entry.key} ({entry.kind}, seq {entry.seq}): {differs}")
            log.error("reindex: journal entry %s (%s) replayed differently: %s",
                      entry.key, entry.kind, differs)


def _index_blob(key: BlobKey, *, blobs: BlobStore, index: Index,
                extended: ExtendedAttributes) -> bool:
    ds, record = read_blob_record(key, blobs, extended=extended)
    with blobs.open(key) as fp:
        header = read_header(fp)
    claim = InstanceClaim(
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
        transfer_syntax_uid=header.transfer_syntax_uid, blob_key=key, size=record.size,
    )
    try:
        index.claim(claim, stored_event(claim, "reindex"))
    except ConflictError as exc:
        log.warning("reindex: %s", exc.reason, extra={"blob_key": key})
    return index.upsert_instance(record)
