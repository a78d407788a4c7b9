"""Order intake: the operations HL7 (ORM/OMI/ADT) and the JSON API share.

Each function works inside the caller's ``WorklistTx`` so that all of one
message is applied in one transaction, or none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydicom.uid import generate_uid

from vna.dicom.uids import invalid_uid_reason
from vna.worklist.model import (
    ON_WORKLIST,
    CodedEntry,
    Order,
    OrderStatus,
    PatientMerge,
    RisPatient,
    now,
)
from vna.worklist.ports import WorklistTx


class OrderErrorKind(StrEnum):
    INVALID = "invalid"
    """The request itself is wrong (missing or malformed values)."""
    UNKNOWN = "unknown"
    """It refers to an order or patient the worklist does not hold."""
    CONFLICT = "conflict"
    """It contradicts what the worklist holds (duplicate order, final state)."""


class OrderError(Exception):
    def __init__(self, kind: OrderErrorKind, reason: str, *, location: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.location = location
        """Where in the request the problem is (e.g. HL7 'OBR^1^18'), when known."""


class PatientDemographics(BaseModel):
    model_config = ConfigDict(frozen=True)

    patient_id: str = Field(min_length=1, max_length=64)
    issuer_of_patient_id: str = Field(default="", max_length=64)
    patient_name: str = Field(default="", max_length=320)
    patient_birth_date: str = Field(default="", pattern=r"^(\d{8})?$")
    patient_sex: str = Field(default="", pattern=r"^(M|F|O)?$")


class OrderRequest(BaseModel):
    """A new or changed order: what ORM^O01/OMI^O23 or the JSON API carries."""

    model_config = ConfigDict(frozen=True)

    patient: PatientDemographics
    placer_order_number: str = Field(default="", max_length=64)
    filler_order_number: str = Field(default="", max_length=64)
    accession_number: str = Field(min_length=1, max_length=16)
    requested_procedure_id: str = Field(min_length=1, max_length=16)
    requested_procedure_description: str = Field(default="", max_length=64)
    requested_procedure_code: CodedEntry | None = None
    scheduled_procedure_step_id: str = Field(min_length=1, max_length=16)
    scheduled_procedure_step_description: str = Field(default="", max_length=64)
    modality: str = Field(default="", max_length=16)
    scheduled_station_ae_title: str = Field(default="", max_length=16)
    scheduled_station_name: str = Field(default="", max_length=16)
    scheduled_procedure_step_start_date: str = Field(default="", pattern=r"^(\d{8})?$")
    scheduled_procedure_step_start_time: str = Field(default="", pattern=r"^(\d{2,6}(\.\d+)?)?$")
    scheduled_performing_physician_name: str = ""
    study_instance_uid: str = ""
    referring_physician_name: str = ""
    requesting_physician: str = ""
    reason_for_the_requested_procedure: str = ""
    admission_id: str = ""
    current_patient_location: str = ""


UidFactory = Callable[[], str]


def new_study_uid() -> str:
    """A fresh Study Instance UID (2.25 UUID form: unique without a registered root)."""
    return str(generate_uid(prefix=None))


def register_patient(patient: PatientDemographics, *, tx: WorklistTx, actor: str = ""
                     ) -> RisPatient:
    """ADT^A01/A04/A08: create or update the patient the RIS describes."""
    existing = tx.get_patient(patient.patient_id, patient.issuer_of_patient_id)
    if existing is not None and existing.merged_into:
        raise OrderError(OrderErrorKind.CONFLICT,
                         "patient was merged into another; update the surviving patient")
    updated = RisPatient(**patient.model_dump(), updated_at=now())
    tx.put_patient(updated)
    tx.audit("patient.registered" if existing is None else "patient.updated", "success",
             actor=actor, subject=_patient_subject(patient.patient_id,
                                                   patient.issuer_of_patient_id))
    return updated


def _patient_subject(patient_id: str, issuer: str) -> str:
    return f"patient:{patient_id}" + (f"^{issuer}" if issuer else "")


def _find_step(request: OrderRequest, tx: WorklistTx) -> Order | None:
    for order in tx.find_orders(accession_number=request.accession_number):
        if (order.requested_procedure_id == request.requested_procedure_id
                and order.scheduled_procedure_step_id == request.scheduled_procedure_step_id):
            return order
    return None


def place_order(request: OrderRequest, *, tx: WorklistTx, actor: str = "",
                new_uid: UidFactory = new_study_uid) -> Order:
    """A new order: one Scheduled Procedure Step with its Study Instance UID assigned now."""
    if _find_step(request, tx) is not None:
        raise OrderError(OrderErrorKind.CONFLICT,
                         "an order with this accession number, requested procedure and "
                         "scheduled step already exists")
    patient = _ensure_patient(request.patient, tx, actor)
    study_uid = request.study_instance_uid or _study_of_requested_procedure(request, tx) \
        or new_uid()
    reason = invalid_uid_reason("Study Instance UID", study_uid)
    if reason:
        raise OrderError(OrderErrorKind.INVALID, reason, location="ZDS^1^1")
    order = Order(
        order_id=uuid.uuid4().hex,
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer_of_patient_id,
        study_instance_uid=study_uid,
        **_order_fields(request),
    )
    tx.put_order(order)
    tx.audit("order.placed", "success", actor=actor, subject=f"order:{order.order_id}",
             detail=f"accession={order.accession_number}")
    return order


def change_order(request: OrderRequest, *, tx: WorklistTx, actor: str = "") -> Order:
    """A changed order (ORC-1 XO): new details, same step, same Study Instance UID."""
    current = _find_step(request, tx)
    if current is None:
        raise OrderError(OrderErrorKind.UNKNOWN, "no such order to change")
    if current.status not in ON_WORKLIST:
        raise OrderError(OrderErrorKind.CONFLICT,
                         f"order is {current.status.value} and can no longer change")
    if request.study_instance_uid and request.study_instance_uid != current.study_instance_uid:
        # Images may already carry the old UID: changing it would orphan them.
        raise OrderError(OrderErrorKind.CONFLICT, "Study Instance UID of an order cannot change")
    patient = _ensure_patient(request.patient, tx, actor)
    changed = current.model_copy(update={
        **_order_fields(request),
        "patient_id": patient.patient_id,
        "issuer_of_patient_id": patient.issuer_of_patient_id,
        "updated_at": now(),
    })
    tx.put_order(changed)
    tx.audit("order.changed", "success", actor=actor, subject=f"order:{current.order_id}")
    return changed


def cancel_orders(*, tx: WorklistTx, accession_number: str = "", placer_order_number: str = "",
                  requested_procedure_id: str = "", scheduled_procedure_step_id: str = "",
                  status: OrderStatus = OrderStatus.CANCELLED, actor: str = "") -> list[Order]:
    """Cancel (CA) or discontinue (DC) the steps named; they leave the worklist."""
    if accession_number:
        found = tx.find_orders(accession_number=accession_number)
    elif placer_order_number:
        found = tx.find_orders(placer_order_number=placer_order_number)
    else:
        raise OrderError(OrderErrorKind.INVALID, "no accession number or placer order number")
    found = [o for o in found
             if (not requested_procedure_id or o.requested_procedure_id == requested_procedure_id)
             and (not scheduled_procedure_step_id
                  or o.scheduled_procedure_step_id == scheduled_procedure_step_id)]
    if not found:
        raise OrderError(OrderErrorKind.UNKNOWN, "no such order to cancel")
    done = []
    for order in found:
        if order.status is status:
            done.append(order)
            continue
        if order.status not in ON_WORKLIST:
            raise OrderError(OrderErrorKind.CONFLICT,
                             f"order is {order.status.value} and cannot be cancelled")
        updated = order.model_copy(update={"status": status, "updated_at": now()})
        tx.put_order(updated)
        tx.audit(f"order.{status.value.lower()}", "success", actor=actor,
                 subject=f"order:{order.order_id}")
        done.append(updated)
    return done


def merge_patients(prior: PatientDemographics, survivor: PatientDemographics, *,
                   tx: WorklistTx, index_merge_ref: str = "", actor: str = "") -> PatientMerge:
    """ADT^A40: the prior patient's orders move to the surviving patient; the merge is
    recorded so that it can be undone.

    The index's side (studies) is done by the caller before this transaction, and
    ``index_merge_ref`` is what it answered: the index and the worklist are separate
    transactions (one SQLite writer at a time), so the caller compensates on failure.
    """
    if (prior.patient_id, prior.issuer_of_patient_id) == (
            survivor.patient_id, survivor.issuer_of_patient_id):
        raise OrderError(OrderErrorKind.INVALID, "a patient cannot be merged into itself",
                         location="MRG^1^1")
    surviving = _ensure_patient(survivor, tx, actor)
    old = tx.get_patient(prior.patient_id, prior.issuer_of_patient_id)
    if old is not None and old.merged_into:
        raise OrderError(OrderErrorKind.CONFLICT, "prior patient was already merged")
    moved = []
    for order in tx.find_orders(patient_id=prior.patient_id,
                                issuer_of_patient_id=prior.issuer_of_patient_id):
        tx.put_order(order.model_copy(update={
            "patient_id": surviving.patient_id,
            "issuer_of_patient_id": surviving.issuer_of_patient_id, "updated_at": now()}))
        moved.append(order.order_id)
    tx.put_patient((old or RisPatient(patient_id=prior.patient_id,
                                      issuer_of_patient_id=prior.issuer_of_patient_id))
                   .model_copy(update={"merged_into": surviving.patient_id, "updated_at": now()}))
    merge = PatientMerge(
        merge_id=uuid.uuid4().hex,
        prior_patient_id=prior.patient_id,
        prior_issuer_of_patient_id=prior.issuer_of_patient_id,
        patient_id=surviving.patient_id,
        issuer_of_patient_id=surviving.issuer_of_patient_id,
        moved_order_ids=tuple(moved),
        index_merge_ref=index_merge_ref,
    )
    tx.put_merge(merge)
    tx.audit("patient.merged", "success", actor=actor,
             subject=_patient_subject(prior.patient_id, prior.issuer_of_patient_id),
             detail=f"into={surviving.patient_id} merge={merge.merge_id} orders={len(moved)}")
    return merge


def undo_merge(merge_id: str, *, tx: WorklistTx, actor: str = "") -> PatientMerge:
    """Reverse a merge: the moved orders go back, the prior patient stands alone again.

    The caller undoes the index's side (``IndexCorrections.unmerge_patients`` with the
    merge's ``index_merge_ref``) after this transaction commits.
    """
    merge = tx.get_merge(merge_id)
    if merge is None:
        raise OrderError(OrderErrorKind.UNKNOWN, "no such merge")
    if merge.undone_at is not None:
        raise OrderError(OrderErrorKind.CONFLICT, "merge was already undone")
    for order_id in merge.moved_order_ids:
        order = tx.get_order(order_id)
        if order is not None:
            tx.put_order(order.model_copy(update={
                "patient_id": merge.prior_patient_id,
                "issuer_of_patient_id": merge.prior_issuer_of_patient_id, "updated_at": now()}))
    prior = tx.get_patient(merge.prior_patient_id, merge.prior_issuer_of_patient_id)
    if prior is not None:
        tx.put_patient(prior.model_copy(update={"merged_into": "", "updated_at": now()}))
    undone = merge.model_copy(update={"undone_at": now()})
    tx.put_merge(undone)
    tx.audit("patient.unmerged", "success", actor=actor,
             subject=_patient_subject(merge.prior_patient_id, merge.prior_issuer_of_patient_id),
             detail=f"merge={merge_id}")
    return undone


def _ensure_patient(patient: PatientDemographics, tx: WorklistTx, actor: str) -> RisPatient:
    """The patient an order names: registered from the order when ADT has not yet been."""
    existing = tx.get_patient(patient.patient_id, patient.issuer_of_patient_id)
    if existing is not None and existing.merged_into:
        raise OrderError(OrderErrorKind.CONFLICT,
                         "patient was merged into another; orders must name the survivor",
                         location="PID^1^3")
    if existing is None:
        return register_patient(patient, tx=tx, actor=actor)
    if _differs(existing, patient):
        # Empty values in an order do not erase what ADT registered.
        merged = {k: v or getattr(existing, k) for k, v in patient.model_dump().items()}
        return register_patient(PatientDemographics(**merged), tx=tx, actor=actor)
    return existing


def _differs(existing: RisPatient, patient: PatientDemographics) -> bool:
    return any(value and getattr(existing, key) != value
               for key, value in patient.model_dump().items())


def _study_of_requested_procedure(request: OrderRequest, tx: WorklistTx) -> str:
    # Steps of one requested procedure belong to one study.
    for order in tx.find_orders(accession_number=request.accession_number):
        if order.requested_procedure_id == request.requested_procedure_id:
            return order.study_instance_uid
    return ""


def _order_fields(request: OrderRequest) -> dict[str, Any]:
    data = request.model_dump(exclude={"patient", "study_instance_uid"})
    data["requested_procedure_code"] = request.requested_procedure_code
    return data
