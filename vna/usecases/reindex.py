"""Rebuild the index from the blob store alone (design invariant 7).

The blob store holds the instances as received, the correction journal
(``vna.journal``): study corrections, patient merges and unmerges, and the
refusal notes naming blobs of instances refused when they were stored (two
senders racing with contradicting instances). Reindex indexes every instance
first, the refused ones left out, then replays the journal's committed entries
in their original order, so that queries, metadata versions and merge records
come out as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.part10 import read_header
from vna.journal import (
    MAGIC,
    REFUSAL,
    JournalEntry,
    JournalError,
    committed_chain,
    decode,
    is_journal,
    is_refusal,
    read_refusal,
)
from vna.model import BlobKey, InstanceClaim
from vna.ports import BlobStore, ConflictError, ConflictKind, Index
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
    refused: int = 0
    """Blobs left out: not accepted when stored (a refusal note names them,
    ``vna.journal``), and contradicting what was."""
    conflicts: list[str] = field(default_factory=list)
    """Blobs holding a SOP Instance UID already indexed from another blob, with no
    refusal note to tell which the archive had accepted: the first found is kept."""


def reindex(*, blobs: BlobStore, index: Index,
            extended: ExtendedAttributes = NO_EXTENDED) -> ReindexReport:
    """Claim and index every blob, then replay the correction journal; existing
    rows and journal entries already applied are kept (idempotent).

    Two passes over the keys: the first finds the journal and the refusal notes
    (small, and few), the second indexes the instances. A blob a note names goes
    after the others (refused ones last, after those the index was away for): the
    instance accepted in its place, if any, is indexed first, and the noted one is
    then left out on the conflict, never merely for the note."""
    report = ReindexReport()
    found = _Found(report)
    for key in blobs.keys():
        report.blobs += 1
        found.sort(key, blobs)
    later: list[BlobKey] = []
    last: list[BlobKey] = []
    for key in blobs.keys():
        if key in found.special:
            continue
        if key in found.refused:
            last.append(key)
        elif key in found.unsettled:
            later.append(key)
        elif not found.sort(key, blobs):
            # An instance. Its head is read again: a key the first pass did not list
            # may be a journal entry written meanwhile (indexing an instance that
            # follows a merge writes one).
            _index_one(key, blobs=blobs, index=index, extended=extended, report=report)
    for key in (*later, *last):
        _index_one(key, blobs=blobs, index=index, extended=extended, report=report,
                   refused_when_stored=True)
    entries = found.entries
    report.journal = len(entries)
    replay_journal(entries, index=index, report=report)
    outcome = ("success" if not (report.failed or report.mismatched or report.conflicts)
               else "incomplete")
    index.record_audit(
        "index.reindexed", outcome, actor="reindex", subject="index",
        detail=f"blobs={report.blobs} indexed={report.indexed} failed={report.failed} "
               f"journal={report.journal} replayed={report.replayed} "
               f"orphaned={report.orphaned} mismatched={len(report.mismatched)} "
               f"refused={report.refused} conflicts={len(report.conflicts)}")
    return report


class _Found:
    """The journal entries and refusal notes among the blobs, and what the notes name."""

    HEAD = max(len(MAGIC), len(REFUSAL))

    def __init__(self, report: ReindexReport) -> None:
        self.report = report
        self.entries: list[JournalEntry] = []
        self.special: set[BlobKey] = set()
        """Keys that are not instances: entries, notes, and blobs that failed here."""
        self.refused: set[BlobKey] = set()  # noted as refused for good
        self.unsettled: set[BlobKey] = set()  # noted as not recorded (the index was away)

    def sort(self, key: BlobKey, blobs: BlobStore) -> bool:
        """Take in ``key`` if it is an entry or a note (or unreadable): True then;
        False for an instance."""
        if key in self.special:
            return True
        try:
            head = blobs.read_range(key, 0, self.HEAD)
            if not (is_journal(head) or is_refusal(head)):
                return False
            self.special.add(key)
            with blobs.open(key) as fp:
                data = fp.read()
            if is_journal(head):
                self.entries.append(decode(key, data))
            else:
                note = read_refusal(key, data)
                (self.refused if note.settled else self.unsettled).add(note.blob_key)
        except JournalError:
            self.special.add(key)
            self.report.failed += 1
            log.exception("reindex: journal entry unreadable", extra={"blob_key": key})
        except Exception:
            self.special.add(key)  # counted once, here
            self.report.failed += 1
            log.exception("reindex: blob unreadable", extra={"blob_key": key})
        return True


def _index_one(key: BlobKey, *, blobs: BlobStore, index: Index, extended: ExtendedAttributes,
               report: ReindexReport, refused_when_stored: bool = False) -> None:
    try:
        if _index_blob(key, blobs=blobs, index=index, extended=extended, report=report,
                       refused_when_stored=refused_when_stored):
            report.indexed += 1
    except Exception:
        report.failed += 1
        log.exception("reindex: blob unreadable", extra={"blob_key": key})


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


def _index_blob(key: BlobKey, *, blobs: BlobStore, index: Index, extended: ExtendedAttributes,
                report: ReindexReport, refused_when_stored: bool) -> bool:
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
        if refused_when_stored:
            report.refused += 1
            log.info("reindex: left out, refused when stored: %s", exc.reason,
                     extra={"blob_key": key})
            return False
        if exc.kind is ConflictKind.SOP_INSTANCE:
            report.conflicts.append(f"{key}: {exc.reason}")
            log.error("reindex: %s; the blob indexed first is kept, this one is not",
                      exc.reason, extra={"blob_key": key})
            return False
        # A study under another patient than its first instances: a study corrected
        # and sent again under its new Patient ID. The journal, replayed next, files
        # the study as it was.
        log.warning("reindex: %s", exc.reason, extra={"blob_key": key})
    return index.upsert_instance(record)
