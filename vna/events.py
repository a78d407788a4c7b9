"""Versioned event schemas; JSON on the wire, routing key = ``routing_key``."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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
    """Parse an event from its JSON wire form; an unknown type raises ValueError.

    In one pass, by pydantic's JSON parser, the type telling which model: parsing
    the JSON (the header's DICOM JSON rides in an instance.stored event) and then
    validating the dict took twice as long. The standard library's json and orjson
    are not used here: orjson reads an integer beyond 64 bits as a float."""
    try:
        return _event_adapter(tuple(_REGISTRY.values())).validate_json(data)
    except ValidationError as exc:
        if any(e["type"] in _NOT_AN_EVENT for e in exc.errors()):
            raise ValueError("not a known VNA event") from None
        raise


_NOT_AN_EVENT = {"union_tag_invalid", "union_tag_not_found", "model_attributes_type",
                 "json_invalid", "model_type", "dict_type"}


@functools.lru_cache(maxsize=4)
def _event_adapter(kinds: tuple[type[Event], ...]) -> TypeAdapter[Event]:
    """Every registered event, told apart by ``type`` (remade if one registers later)."""
    union = Union[kinds]  # type: ignore[valid-type]  # noqa: UP007 (a tuple of types)
    return TypeAdapter(Annotated[union, Field(discriminator="type")])


def encode_event(event: Event) -> bytes:
    return event.model_dump_json().encode()
