"""Value objects that cross module boundaries (frozen pydantic models)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NewType

from pydantic import BaseModel, ConfigDict

from vna.dicom.extended import ExtraValue

BlobKey = NewType("BlobKey", str)
"""Lower-case hex SHA-256 of a blob's bytes: its content address."""

_BLOB_KEY = re.compile(r"^[0-9a-f]{64}$")


def is_blob_key(value: str) -> bool:
    return bool(_BLOB_KEY.match(value))


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class InstanceRef(Frozen):
    """Where an instance sits in the DICOM hierarchy."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


class InstanceClaim(Frozen):
    """What the store path records synchronously for each instance it accepts.

    The claim is written in the same transaction as the ``instance.stored``
    event (transactional outbox), and its unique keys are what make repeated
    sends idempotent and conflicting sends visible.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str = ""
    transfer_syntax_uid: str
    blob_key: BlobKey
    dataset_sha256: str = ""
    """SHA-256 of the data set alone, in claims recorded by earlier versions; empty now:
    the framing around a data set is deterministic (``vna.dicom.part10``), so for one
    SOP Instance UID the blob key identifies the data set (equal keys, same content).
    Two claims that both carry a hash still match on it."""
    size: int


class PendingCommitment(Frozen):
    """A Storage Commitment request whose report is owed to a requester in
    ``VNA_PEERS``: kept in the index until the report is delivered or given up, so
    that a restart does not lose it."""

    request_id: str
    requester: str
    """The requester's AE title (its address: ``VNA_PEERS``)."""
    transaction_uid: str
    items: list[tuple[str, str]]
    """(Referenced SOP Class UID, Referenced SOP Instance UID) as asked."""
    attempts: int = 0
    """Deliveries tried and failed so far."""


class StoredInstance(Frozen):
    """An instance as the index knows it."""

    ref: InstanceRef
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: BlobKey
    size: int
    stored_at: datetime | None = None


@dataclass(frozen=True)
class SequenceItem:
    """One item of a sequence the index keeps (``vna.dicom.matching.SEQUENCES``)."""

    values: dict[str, str]
    """Its matching attributes (keyword -> value, as a column holds it; '' if absent)."""
    item_json: str
    """The whole item as DICOM JSON: what a search returns."""


@dataclass
class IndexRecord:
    """Everything the index keeps of one instance, extracted from its header."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    metadata_json: str
    """The instance's DICOM JSON (PS3.18 F), bulk data as BulkDataURIs."""
    blob_key: BlobKey
    size: int
    transfer_syntax_uid: str
    extra: dict[str, Any] = field(default_factory=dict)
    extended: list[ExtraValue] = field(default_factory=list)
    """Values of the configured extended query attributes (``vna.dicom.extended``)."""
    sequence_items: dict[str, list[SequenceItem]] | None = None
    """Items of the sequences the index keeps, by sequence keyword (None: not extracted,
    as in an event written by an earlier version; the index takes them from the JSON)."""
