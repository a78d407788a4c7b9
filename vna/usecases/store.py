"""The one store path for C-STORE and STOW-RS (design §2, invariants 1, 3, 4, 5).

begin (frame + hash while streaming) -> validate -> store blob (write-once)
-> claim + event in one transaction -> answer. Cleanup on every failure path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from vna import metrics
from vna.dicom.header import extract_record
from vna.dicom.part10 import CHUNK, NotPart10Error, file_meta_bytes, read_header
from vna.dicom.uids import invalid_uid_reason
from vna.events import InstanceStored
from vna.journal import BlobJournal
from vna.model import BlobKey, IndexRecord, InstanceClaim, InstanceRef
from vna.ports import BlobStore, ClaimOutcome, ConflictError, ConflictKind, Index, Unavailable

log = logging.getLogger("vna.store")


class StoreFailure(Enum):
    """Why an instance was not stored; each maps to a DIMSE status and an HTTP code."""

    UNREADABLE = "unreadable"  # not DICOM, truncated, unparsable
    INVALID = "invalid"  # required attribute missing or invalid (UIDs)
    MISMATCH = "mismatch"  # data set disagrees with the request (SOP UID, study)
    SOP_CONFLICT = "sop-conflict"
    PATIENT_CONFLICT = "patient-conflict"
    SERIES_CONFLICT = "series-conflict"
    UNAVAILABLE = "unavailable"  # could not be made durable: retry later


class StoreError(Exception):
    def __init__(self, failure: StoreFailure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason


@dataclass(frozen=True)
class Received:
    """A data set as it arrived, in a local file the store path may consume."""

    path: Path
    dataset_offset: int | None = None
    """Where the data set starts in ``path``; None when ``path`` is Part-10 framed."""
    transfer_syntax_uid: str | None = None
    """Required with ``dataset_offset`` (raw data set); else read from the File Meta."""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    """What the request announced (C-STORE command); checked against the data set."""
    study_instance_uid: str | None = None
    """STOW-RS to /studies/{study}: the data set must belong to it."""
    source_ae: str = ""
    framed: Framed | None = None
    """Set when ``path`` is already framed by a ``Staging`` (VNA's File Meta, then the
    data set as received); the store path then takes the file over as it is."""


@dataclass(frozen=True)
class Framed:
    """What a ``Staging`` learnt while writing: the blob key, where the data set starts."""

    blob_key: BlobKey
    size: int
    transfer_syntax_uid: str
    dataset_offset: int
    """Where the data set starts: the length of VNA's own File Meta before it."""


_CONFLICT_FAILURE = {
    ConflictKind.SOP_INSTANCE: StoreFailure.SOP_CONFLICT,
    ConflictKind.PATIENT: StoreFailure.PATIENT_CONFLICT,
    ConflictKind.SERIES: StoreFailure.SERIES_CONFLICT,
}


@dataclass(frozen=True)
class StoreResult:
    ref: InstanceRef
    sop_class_uid: str
    blob_key: BlobKey
    outcome: ClaimOutcome


_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID",
]


def store_instance(received: Received, *, blobs: BlobStore, index: Index,
                   staging_dir: Path | None = None) -> StoreResult:
    """Store one instance durably, or raise ``StoreError`` having stored nothing new."""
    started = time.perf_counter()
    framed: Path | None = None
    claim: InstanceClaim | None = None
    wrote_blob = False
    try:
        framed, framing = _frame(received, staging_dir)
        blob_key, size = framing.blob_key, framing.size
        claim, record = _validate(framed, received, framing)
        # index.claim() decides atomically; checking first spares the blob store a
        # write for an instance that is a duplicate or will be refused.
        if index.check_claim(claim) is ClaimOutcome.DUPLICATE:
            metrics.INSTANCES_DUPLICATE.inc()
            return _result(claim, ClaimOutcome.DUPLICATE)
        # True: these bytes were not in the store before (see _note_refusal).
        wrote_blob = blobs.put_file(blob_key, framed)
        outcome = index.claim(claim, stored_event(claim, received.source_ae, record))
        if outcome is ClaimOutcome.NEW:
            metrics.INSTANCES_STORED.inc()
            metrics.BYTES_STORED.inc(size)
            # DEBUG: at hundreds a second a line each is noise and costs 8 % of a
            # receiver's CPU; receivers and STOW-RS log one line per association
            # or request at INFO.
            log.debug("stored", extra={"sop_instance_uid": claim.sop_instance_uid,
                                      "blob_key": blob_key, "size": size,
                                      "source_ae": received.source_ae})
        else:
            metrics.INSTANCES_DUPLICATE.inc()
        return _result(claim, outcome)
    except ConflictError as exc:
        failure = _CONFLICT_FAILURE[exc.kind]
        metrics.STORE_FAILURES.labels(failure.value).inc()
        log.warning("refused: %s", exc.reason, extra={"source_ae": received.source_ae,
                                                      "sop_instance_uid":
                                                      received.sop_instance_uid or ""})
        _audit_refusal(index, failure, exc.reason, received, claim)
        if wrote_blob and claim is not None:
            _note_refusal(blobs, claim, failure, exc.reason, staging_dir)
        raise StoreError(failure, exc.reason) from exc
    except Unavailable as exc:
        metrics.STORE_FAILURES.labels(StoreFailure.UNAVAILABLE.value).inc()
        log.error("store unavailable: %s", exc)
        if wrote_blob and claim is not None:  # the blob is in, its claim is not
            _note_refusal(blobs, claim, StoreFailure.UNAVAILABLE,
                          "the index could not record it; its sender was told to retry",
                          staging_dir)
        raise StoreError(StoreFailure.UNAVAILABLE, "archive storage unavailable, retry") from exc
    except StoreError as exc:
        metrics.STORE_FAILURES.labels(exc.failure.value).inc()
        log.warning("refused: %s", exc.reason, extra={"source_ae": received.source_ae})
        raise
    finally:
        if framed is not None:
            _unlink(framed)
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)


def _audit_refusal(index: Index, failure: StoreFailure, reason: str, received: Received,
                   claim: InstanceClaim | None) -> None:
    """Conflicts are refused and recorded for a person to look at (invariant 5)."""
    try:
        index.record_audit(
            "store", failure.value, actor=received.source_ae,
            subject=claim.sop_instance_uid if claim else (received.sop_instance_uid or ""),
            detail=json.dumps({"reason": reason,
                               "study_instance_uid": claim.study_instance_uid if claim else "",
                               "blob_key": claim.blob_key if claim else ""}),
        )
    except Exception:
        log.exception("audit record could not be written")


def _note_refusal(blobs: BlobStore, claim: InstanceClaim, failure: StoreFailure, reason: str,
                  staging_dir: Path | None) -> None:
    """The refused bytes were written to the blob store before a concurrent
    store's claim won, or before the index failed to record the claim: a refusal
    note says so, for ``vna reindex`` (``vna.journal.REFUSAL``). Only for bytes
    this store wrote: a blob that was there before may be an accepted instance's.
    Written before the refusal is answered; if it cannot be, the refusal still is."""
    try:
        BlobJournal(blobs, staging_dir).refuse(
            claim.blob_key, sop_instance_uid=claim.sop_instance_uid,
            failure=failure.value, reason=reason)
    except Exception:
        log.exception("refusal note not written: vna reindex will count the refused "
                      "blob as a conflict", extra={"blob_key": claim.blob_key})


def _result(claim: InstanceClaim, outcome: ClaimOutcome) -> StoreResult:
    return StoreResult(
        ref=InstanceRef(study_instance_uid=claim.study_instance_uid,
                        series_instance_uid=claim.series_instance_uid,
                        sop_instance_uid=claim.sop_instance_uid),
        sop_class_uid=claim.sop_class_uid, blob_key=claim.blob_key, outcome=outcome,
    )


def stored_event(claim: InstanceClaim, source_ae: str, record: IndexRecord | None = None
                 ) -> InstanceStored:
    """The ``instance.stored`` event recorded with ``claim`` (and its index record,
    when the caller has the header parsed already)."""
    return InstanceStored(
        sop_instance_uid=claim.sop_instance_uid, sop_class_uid=claim.sop_class_uid,
        study_instance_uid=claim.study_instance_uid,
        series_instance_uid=claim.series_instance_uid,
        transfer_syntax_uid=claim.transfer_syntax_uid, blob_key=claim.blob_key,
        size=claim.size, source_ae=source_ae, record=record,
    )


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class Staging:
    """A staging file being framed: VNA's File Meta, then the data set as it
    arrives, hashed as it is written (the blob key).

    Both ways in write through it: ``_frame`` copying a received file, and the
    DIMSE storage receiver writing P-DATA fragments straight off the socket."""

    def __init__(self, staging_dir: Path | None, transfer_syntax_uid: str, sop_class_uid: str,
                 sop_instance_uid: str) -> None:
        for name, value in (("Transfer Syntax UID", transfer_syntax_uid),
                            ("SOP Class UID", sop_class_uid),
                            ("SOP Instance UID", sop_instance_uid)):
            reason = invalid_uid_reason(name, value)
            if reason:
                raise StoreError(StoreFailure.INVALID, reason)
        meta = file_meta_bytes(transfer_syntax_uid, sop_class_uid, sop_instance_uid)
        self.transfer_syntax_uid = transfer_syntax_uid
        self._meta_size = len(meta)
        self._whole = hashlib.sha256(meta)
        self.size = len(meta)
        fd, name = tempfile.mkstemp(prefix="in-", suffix=".dcm", dir=staging_dir)
        self.path = Path(name)
        self._out = os.fdopen(fd, "wb")
        try:
            self._out.write(meta)
        except BaseException:
            self.discard()
            raise

    def write(self, chunk: bytes | memoryview) -> None:
        self._whole.update(chunk)
        self._out.write(chunk)
        self.size += len(chunk)

    def finish(self) -> Framed:
        """Close the file; the caller hands it to ``store_instance``, which consumes it."""
        try:
            self._out.close()
        except BaseException:
            self.discard()
            raise
        if self.size == self._meta_size:
            self.discard()
            raise StoreError(StoreFailure.UNREADABLE, "empty data set")
        return Framed(blob_key=BlobKey(self._whole.hexdigest()), size=self.size,
                      transfer_syntax_uid=self.transfer_syntax_uid,
                      dataset_offset=self._meta_size)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()
        _unlink(self.path)


def _frame(received: Received, staging_dir: Path | None) -> tuple[Path, Framed]:
    """Copy the data set behind VNA's File Meta into a staging file, hashing as it goes."""
    if received.framed is not None:
        return received.path, received.framed  # framed as it arrived (DIMSE receiver)
    try:
        src = open(received.path, "rb")
    except OSError as exc:
        raise StoreError(StoreFailure.UNREADABLE, "data set could not be read") from exc
    with src:
        if received.dataset_offset is None:
            try:
                header = read_header(src)
            except NotPart10Error as exc:
                raise StoreError(StoreFailure.UNREADABLE, str(exc)) from exc
            ts = header.transfer_syntax_uid
            sop_class = received.sop_class_uid or header.sop_class_uid
            sop_uid = received.sop_instance_uid or header.sop_instance_uid
            src.seek(header.dataset_offset)
        else:
            if not received.transfer_syntax_uid:
                raise StoreError(StoreFailure.INVALID, "transfer syntax unknown")
            ts = received.transfer_syntax_uid
            sop_class = received.sop_class_uid or ""
            sop_uid = received.sop_instance_uid or ""
            src.seek(received.dataset_offset)
        staging = Staging(staging_dir, ts, sop_class, sop_uid)
        try:
            while chunk := src.read(CHUNK):
                staging.write(chunk)
        except BaseException:
            staging.discard()
            raise
    return staging.path, staging.finish()


def _validate(framed: Path, received: Received, framing: Framed
              ) -> tuple[InstanceClaim, IndexRecord | None]:
    record: IndexRecord | None = None
    blob_key, size, ts = framing.blob_key, framing.size, framing.transfer_syntax_uid
    try:
        with open(framed, "rb") as fp:
            # Defer large values: read every element header, never pixel data.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = _read_dataset(fp, framing)
            if any("End of file" in str(w.message) for w in caught):
                raise StoreError(StoreFailure.UNREADABLE, "data set is truncated")
            for elem in ds._dict.values():
                # Undefined length (encapsulated pixel data) was read through to
                # its delimiter by the parser; a defined length must fit the file.
                if (isinstance(elem, RawDataElement) and elem.value is None and elem.length
                        and elem.length != 0xFFFFFFFF and elem.value_tell + elem.length > size):
                    raise StoreError(StoreFailure.UNREADABLE, "data set is truncated")
            try:
                # The one parse of the header on the store path also yields what the
                # index keeps, so the indexer need not read the blob again.
                record = extract_record(ds, blob_key=blob_key, size=size,
                                        transfer_syntax_uid=ts)
            except Exception:  # the indexer reads the blob instead
                log.warning("index record not extracted on the store path", exc_info=True)
            # The claim's identifiers as the index will have them; pydicom's own
            # decoding of each (2 ms for six) only when the record could not be made.
            values = _record_values(record) if record is not None else _header_values(ds)
    except StoreError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, IndexError, OSError, TypeError,
            NotImplementedError, OverflowError, struct.error) as exc:
        # What pydicom raises on a damaged header: a length cut short is struct.error.
        raise StoreError(StoreFailure.UNREADABLE,
                         f"data set cannot be parsed ({type(exc).__name__})") from exc
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        reason = invalid_uid_reason(keyword, values[keyword])
        if reason:
            raise StoreError(StoreFailure.INVALID, reason)
    if received.sop_instance_uid and values["SOPInstanceUID"] != received.sop_instance_uid:
        raise StoreError(StoreFailure.MISMATCH,
                         "SOPInstanceUID differs from the Affected SOP Instance UID")
    if received.sop_class_uid and values["SOPClassUID"] != received.sop_class_uid:
        raise StoreError(StoreFailure.MISMATCH,
                         "SOPClassUID differs from the Affected SOP Class UID")
    if received.study_instance_uid and values["StudyInstanceUID"] != received.study_instance_uid:
        raise StoreError(StoreFailure.MISMATCH, "instance belongs to another study")
    for keyword in ("PatientID", "IssuerOfPatientID"):  # LO: what the claim holds
        if len(values[keyword]) > 64:
            raise StoreError(StoreFailure.INVALID, f"{keyword} longer than 64 characters")
    return InstanceClaim(
        sop_instance_uid=values["SOPInstanceUID"], sop_class_uid=values["SOPClassUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"], patient_id=values["PatientID"],
        issuer_of_patient_id=values["IssuerOfPatientID"], transfer_syntax_uid=ts,
        blob_key=blob_key, size=size,
    ), record


def _read_dataset(fp: BinaryIO, framing: Framed) -> pydicom.Dataset:
    """The data set of a staged file, every element header read, large values deferred.

    The File Meta before it is VNA's own (``Staging``), its length and transfer
    syntax known: reading it again would cost a quarter of the parse."""
    ts = framing.transfer_syntax_uid
    if ts == DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(fp, defer_size=1024)  # pydicom inflates it
    implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
    fp.seek(framing.dataset_offset)
    dataset = read_dataset(fp, implicit, little, defer_size=1024)
    # A FileDataset knows its file: deferred values are read from it when asked for.
    return FileDataset(fp, dataset, None, FileMetaDataset(), implicit, little)


def _record_values(record: IndexRecord) -> dict[str, str]:
    columns = {"SOPClassUID": record.instance, "SOPInstanceUID": record.instance,
               "StudyInstanceUID": record.study, "SeriesInstanceUID": record.series,
               "PatientID": record.patient, "IssuerOfPatientID": record.patient}
    return {keyword: str(level.get(keyword) or "") for keyword, level in columns.items()}


def _header_values(ds: pydicom.Dataset) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword in _HEADER_TAGS:
        try:
            value = ds.get(keyword, "")
        except Exception as exc:
            raise StoreError(StoreFailure.UNREADABLE, f"{keyword} cannot be decoded") from exc
        values[keyword] = "" if value is None else str(value)
    return values
