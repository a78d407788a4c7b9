"""The worklist's value objects (frozen): what the RIS told us and what the modalities did."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


def now() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class OrderStatus(StrEnum):
    """Where a Scheduled Procedure Step stands (its order's status follows it)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"
    CANCELLED = "CANCELLED"


ON_WORKLIST = frozenset({OrderStatus.SCHEDULED, OrderStatus.IN_PROGRESS})
"""Steps a modality may still see; cancelled, completed and discontinued ones leave."""


class MppsStatus(StrEnum):
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


FINAL_MPPS = frozenset({MppsStatus.COMPLETED, MppsStatus.DISCONTINUED})


class ReconciliationStatus(StrEnum):
    OPEN = "OPEN"
    LINKED = "LINKED"
    REJECTED = "REJECTED"


class RisPatient(Frozen):
    """A patient as the RIS registered it (ADT); the source of MWL demographics."""

    patient_id: str
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    merged_into: str = ""
    """Patient ID this one was merged into (ADT^A40); '' while it stands on its own."""
    updated_at: datetime = Field(default_factory=now)


class CodedEntry(Frozen):
    code_value: str = ""
    coding_scheme_designator: str = ""
    code_meaning: str = ""


class Order(Frozen):
    """One requested procedure with its one Scheduled Procedure Step (IHE SWF: one OBR)."""

    order_id: str
    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str
    requested_procedure_id: str
    requested_procedure_description: str = ""
    requested_procedure_code: CodedEntry | None = None
    scheduled_procedure_step_id: str
    scheduled_procedure_step_description: str = ""
    modality: str = ""
    scheduled_station_ae_title: str = ""
    scheduled_station_name: str = ""
    scheduled_procedure_step_start_date: str = ""
    scheduled_procedure_step_start_time: str = ""
    scheduled_performing_physician_name: str = ""
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str = ""
    referring_physician_name: str = ""
    requesting_physician: str = ""
    reason_for_the_requested_procedure: str = ""
    admission_id: str = ""
    current_patient_location: str = ""
    status: OrderStatus = OrderStatus.SCHEDULED
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    @property
    def on_worklist(self) -> bool:
        return self.status in ON_WORKLIST


class PerformedInstance(Frozen):
    series_instance_uid: str
    sop_class_uid: str = ""
    sop_instance_uid: str


class MppsInstance(Frozen):
    """A Modality Performed Procedure Step as the modality reported it."""

    sop_instance_uid: str
    status: MppsStatus
    attributes_json: str
    """Every attribute received so far (N-CREATE, then N-SETs), as DICOM JSON."""
    study_instance_uid: str = ""
    accession_number: str = ""
    patient_id: str = ""
    order_ids: tuple[str, ...] = ()
    performed: tuple[PerformedInstance, ...] = ()
    performing_ae_title: str = ""
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)


class Binding(Frozen):
    """Accession Number <-> Study Instance UID, as kept between worklist and archive."""

    study_instance_uid: str
    order_id: str
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str = ""
    how: str = "matched"
    """'matched' when images arrived as ordered, 'reconciled' when a person linked them."""
    bound_at: datetime = Field(default_factory=now)


class ReconciliationItem(Frozen):
    """A study whose images do not fit any order: stored, waiting for a person."""

    item_id: str
    study_instance_uid: str
    status: ReconciliationStatus = ReconciliationStatus.OPEN
    reason: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    accession_number: str = ""
    order_id: str = ""
    """The order the study was linked to (status LINKED)."""
    resolved_by: str = ""
    note: str = ""
    created_at: datetime = Field(default_factory=now)
    resolved_at: datetime | None = None


class PatientMerge(Frozen):
    """ADT^A40: ``prior`` merged into ``patient``; kept so that it can be undone."""

    merge_id: str
    prior_patient_id: str
    prior_issuer_of_patient_id: str = ""
    patient_id: str
    issuer_of_patient_id: str = ""
    moved_order_ids: tuple[str, ...] = ()
    index_merge_ref: str = ""
    """What the index answered for its side of the merge (needed to undo it there)."""
    merged_at: datetime = Field(default_factory=now)
    undone_at: datetime | None = None


class AuditRecord(Frozen):
    """One audited step; ``hash`` chains it to the previous one (tamper evidence)."""

    at: datetime
    action: str
    outcome: str
    actor: str = ""
    subject: str = ""
    detail: str = ""
    prev_hash: str = ""
    hash: str = ""
