"""Versioned event schemas; JSON on the wire, routing key = ``routing_key``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from vna.model import BlobKey, IndexRecord


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


_REGISTRY: dict[str, type[Event]] = {}


class Event(BaseModel):
    """Base of every event. Subclasses register themselves by routing key."""

    model_config = ConfigDict(frozen=True)

    routing_key: ClassVar[str]
    schema_version: int = 1
    event_id: str = Field(default_factory=_new_id)
    occurred_at: datetime = Field(default_factory=_now)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "routing_key" in cls.__dict__:
            _REGISTRY[cls.routing_key] = cls


class InstanceStored(Event):
    """A new instance's bytes are durable at ``blob_key``."""

    routing_key: ClassVar[str] = "instance.stored"
    type: Literal["instance.stored"] = "instance.stored"
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    blob_key: BlobKey
    size: int
    source_ae: str = ""
    record: IndexRecord | None = None
    """The index's view of the instance, extracted from the header the store path
    parsed anyway; spares the indexer reading the blob again (None: it reads it)."""


class InstanceIndexed(Event):
    """The index holds an instance; readers can find it."""

    routing_key: ClassVar[str] = "instance.indexed"
    type: Literal["instance.indexed"] = "instance.indexed"
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    blob_key: BlobKey
    stored_event_id: str
    stored_at: datetime
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    accession_number: str | None = None
    """As indexed, for the order binding (None: not carried; read the index)."""


class PerformedInstanceRef(BaseModel):
    """One instance a Modality Performed Procedure Step reports."""

    model_config = ConfigDict(frozen=True)

    series_instance_uid: str
    sop_class_uid: str = ""
    sop_instance_uid: str


class MppsCompleted(Event):
    """A modality reported a procedure step COMPLETED, with what it produced."""

    routing_key: ClassVar[str] = "mpps.completed"
    type: Literal["mpps.completed"] = "mpps.completed"
    mpps_sop_instance_uid: str
    study_instance_uid: str
    accession_number: str = ""
    order_ids: tuple[str, ...] = ()
    performed: tuple[PerformedInstanceRef, ...] = ()


class StudyComplete(Event):
    """Every instance the study's completed MPPS list is in the archive (published once)."""

    routing_key: ClassVar[str] = "study.complete"
    type: Literal["study.complete"] = "study.complete"
    study_instance_uid: str
    accession_number: str = ""
    mpps_sop_instance_uids: tuple[str, ...] = ()
    instance_count: int


def decode_event(data: bytes | str) -> Event:
    """Parse an event from its JSON wire form; an unknown type raises ValueError."""
    raw = json.loads(data)
    cls = _REGISTRY.get(raw.get("type", "")) if isinstance(raw, dict) else None
    if cls is None:
        raise ValueError("not a known VNA event")
    return cls.model_validate(raw)


def encode_event(event: Event) -> bytes:
    return event.model_dump_json().encode()
