"""Modality Performed Procedure Step SOP Class, SCP side (PS3.4 F.7).

IN PROGRESS on N-CREATE; then, by N-SET, COMPLETED or DISCONTINUED, after
which the instance may no longer be updated. COMPLETED publishes
``mpps.completed`` and completes the order; DISCONTINUED puts a step chosen
by mistake back on the worklist and discontinues it otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from vna.dicom import status
from vna.dicom.status import (  # the N-service statuses MPPS answers (PS3.4 F.7.2)
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
)
from vna.dicom.uids import invalid_uid_reason
from vna.events import MppsCompleted, PerformedInstanceRef
from vna.ports import Index, Unavailable
from vna.worklist.binding import check_study_complete
from vna.worklist.model import (
    FINAL_MPPS,
    MppsInstance,
    MppsStatus,
    Order,
    OrderStatus,
    PerformedInstance,
    now,
)
from vna.worklist.ports import WorklistStore, WorklistTx

log = logging.getLogger("vna.worklist.mpps")

MAY_NO_LONGER_BE_UPDATED = 0xA710
"""Error ID of PROCESSING_FAILURE when the step is already COMPLETED or DISCONTINUED."""

INCORRECT_WORKLIST_ENTRY = "110514"
"""DCM code: 'Incorrect worklist entry selected' (PPS Discontinuation Reason)."""

# Type 1 on N-CREATE (PS3.4 Table F.7.2-1).
_REQUIRED_ON_CREATE = (
    "PerformedProcedureStepStatus", "PerformedProcedureStepID", "PerformedStationAETitle",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality",
)
# Type 1 once the step is final.
_REQUIRED_WHEN_FINAL = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
# Only N-CREATE sets these (PS3.4 Table F.7.2-1: N-SET usage "Not allowed").
_CREATE_ONLY = (
    "ScheduledStepAttributesSequence", "PatientID", "PatientName", "PatientBirthDate",
    "PatientSex", "PerformedProcedureStepID", "PerformedStationAETitle",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality",
    "StudyID",
)


@dataclass
class MppsResult:
    status: int
    comment: str = ""
    attributes: Dataset | None = None
    sop_instance_uid: str = ""


def _fail(code: int, comment: str) -> MppsResult:
    return MppsResult(code, status.error_comment(comment))


def _attributes(mpps: MppsInstance) -> Dataset:
    return Dataset.from_json(mpps.attributes_json)


def _performed(ds: Dataset) -> tuple[PerformedInstance, ...]:
    out = []
    for series in ds.get("PerformedSeriesSequence") or []:
        series_uid = str(series.get("SeriesInstanceUID", ""))
        for ref in [*(series.get("ReferencedImageSequence") or []),
                    *(series.get("ReferencedNonImageCompositeSOPInstanceSequence") or [])]:
            out.append(PerformedInstance(
                series_instance_uid=series_uid,
                sop_class_uid=str(ref.get("ReferencedSOPClassUID", "")),
                sop_instance_uid=str(ref.get("ReferencedSOPInstanceUID", ""))))
    return tuple(out)


def _linked_orders(ds: Dataset, tx: WorklistTx) -> list[Order]:
    """The orders the step performs, from its Scheduled Step Attributes Sequence."""
    found: dict[str, Order] = {}
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        accession = str(item.get("AccessionNumber", ""))
        rp_id = str(item.get("RequestedProcedureID", ""))
        sps_id = str(item.get("ScheduledProcedureStepID", ""))
        study = str(item.get("StudyInstanceUID", ""))
        candidates = (tx.find_orders(accession_number=accession) if accession
                      else tx.find_orders(study_instance_uid=study) if study else [])
        for order in candidates:
            if (not rp_id or order.requested_procedure_id == rp_id) and (
                    not sps_id or order.scheduled_procedure_step_id == sps_id):
                found[order.order_id] = order
    return list(found.values())


def _holding_nul(ds: Dataset) -> MppsResult | None:
    """A text value with NUL inside (a damaged one) is refused with its name: the
    worklist database (PostgreSQL) refuses it, which answered "try again" for ever."""
    for elem in ds.iterall():  # into sequence items too
        if elem.VR == "SQ":
            continue  # its items' elements come next
        values = elem.value if elem.VM > 1 else [elem.value]
        if any(v is not None and not isinstance(v, (bytes, Dataset)) and "\0" in str(v)
               for v in values):
            return _fail(INVALID_ATTRIBUTE_VALUE,
                         f"{elem.keyword or elem.tag} holds a NUL character")
    return None


def _check_required(ds: Dataset, keywords: tuple[str, ...]) -> MppsResult | None:
    for keyword in keywords:
        if keyword not in ds:
            return _fail(MISSING_ATTRIBUTE, f"{keyword} is missing")
        if ds[keyword].value in (None, "", b""):
            return _fail(MISSING_ATTRIBUTE_VALUE, f"{keyword} has no value")
    return None


def create_mpps(attributes: Dataset, *, sop_instance_uid: str | None, store: WorklistStore,
                calling_ae: str = "") -> MppsResult:
    """N-CREATE: a new step, IN PROGRESS; its orders are marked in progress."""
    uid = sop_instance_uid or str(generate_uid(prefix=None))
    reason = invalid_uid_reason("Affected SOP Instance UID", uid)
    if reason:
        return _fail(INVALID_ATTRIBUTE_VALUE, reason)
    missing = _check_required(attributes, _REQUIRED_ON_CREATE) or _holding_nul(attributes)
    if missing:
        return missing
    state = str(attributes.PerformedProcedureStepStatus)
    if state != MppsStatus.IN_PROGRESS.value:
        return _fail(INVALID_ATTRIBUTE_VALUE, "status on N-CREATE must be IN PROGRESS")
    steps = attributes.get("ScheduledStepAttributesSequence")
    if not steps:
        return _fail(MISSING_ATTRIBUTE, "ScheduledStepAttributesSequence is missing")
    study = str(steps[0].get("StudyInstanceUID", ""))
    reason = invalid_uid_reason("Study Instance UID", study)
    if reason:
        return _fail(INVALID_ATTRIBUTE_VALUE, reason)
    try:
        with store.transaction() as tx:
            if tx.get_mpps(uid) is not None:
                return _fail(DUPLICATE_SOP_INSTANCE, "MPPS instance already exists")
            orders = _linked_orders(attributes, tx)
            mpps = MppsInstance(
                sop_instance_uid=uid,
                status=MppsStatus.IN_PROGRESS,
                attributes_json=attributes.to_json(),
                study_instance_uid=study,
                accession_number=str(steps[0].get("AccessionNumber", "")),
                patient_id=str(attributes.get("PatientID", "")),
                order_ids=tuple(o.order_id for o in orders),
                performed=_performed(attributes),
                performing_ae_title=calling_ae,
            )
            tx.put_mpps(mpps)
            for order in orders:
                if order.status is OrderStatus.SCHEDULED:
                    tx.put_order(order.model_copy(update={
                        "status": OrderStatus.IN_PROGRESS, "updated_at": now()}))
            tx.audit("mpps.created", "success", actor=f"dicom:{calling_ae}",
                     subject=f"mpps:{uid}", detail=f"orders={len(orders)}")
    except Unavailable as exc:
        log.warning("MPPS N-CREATE not recorded: %s", exc)
        return _fail(RESOURCE_LIMITATION, "worklist store unavailable, try again")
    log.info("MPPS created", extra={"mpps": uid, "orders": len(orders)})
    return MppsResult(status.SUCCESS, attributes=attributes, sop_instance_uid=uid)


def set_mpps(modifications: Dataset, *, sop_instance_uid: str, store: WorklistStore,
             index: Index | None = None, calling_ae: str = "") -> MppsResult:
    """N-SET: update an IN PROGRESS step; COMPLETED or DISCONTINUED is final."""
    for elem in modifications:
        if elem.keyword in _CREATE_ONLY:
            return _fail(INVALID_ATTRIBUTE_VALUE,
                         f"{elem.keyword} may not be set by N-SET")
    damaged = _holding_nul(modifications)
    if damaged:
        return damaged
    new_state = str(modifications.get("PerformedProcedureStepStatus", "") or "")
    if new_state and new_state not in {s.value for s in MppsStatus}:
        return _fail(INVALID_ATTRIBUTE_VALUE, f"status {new_state!r} is not a PPS status")
    completed: MppsInstance | None = None
    try:
        with store.transaction() as tx:
            current = tx.get_mpps(sop_instance_uid)
            if current is None:
                return _fail(NO_SUCH_OBJECT_INSTANCE, "no such MPPS instance")
            if current.status in FINAL_MPPS:
                return MppsResult(PROCESSING_FAILURE, status.error_comment(
                    f"MPPS is {current.status.value}: may no longer be updated"))
            ds = _attributes(current)
            for elem in modifications:
                ds[elem.tag] = elem
            state = MppsStatus(str(ds.PerformedProcedureStepStatus))
            if state in FINAL_MPPS:
                missing = _check_required(ds, _REQUIRED_WHEN_FINAL)
                if missing:
                    return missing
            updated = current.model_copy(update={
                "status": state, "attributes_json": ds.to_json(),
                "performed": _performed(ds), "updated_at": now()})
            tx.put_mpps(updated)
            _follow_orders(updated, ds, tx)
            tx.audit(f"mpps.{state.value.lower().replace(' ', '_')}"
                     if state in FINAL_MPPS else "mpps.updated", "success",
                     actor=f"dicom:{calling_ae}", subject=f"mpps:{sop_instance_uid}")
            if state is MppsStatus.COMPLETED:
                tx.emit(MppsCompleted(
                    mpps_sop_instance_uid=sop_instance_uid,
                    study_instance_uid=updated.study_instance_uid,
                    accession_number=updated.accession_number,
                    order_ids=updated.order_ids,
                    performed=tuple(PerformedInstanceRef(**p.model_dump())
                                    for p in updated.performed),
                ))
                completed = updated
    except Unavailable as exc:
        log.warning("MPPS N-SET not recorded: %s", exc)
        return _fail(RESOURCE_LIMITATION, "worklist store unavailable, try again")
    if completed is not None and index is not None:
        # Images often arrive before the MPPS: the study may be complete right now.
        check_study_complete(completed.study_instance_uid, store=store, index=index)
    return MppsResult(status.SUCCESS, attributes=modifications,
                      sop_instance_uid=sop_instance_uid)


def _follow_orders(mpps: MppsInstance, ds: Dataset, tx: WorklistTx) -> None:
    if mpps.status is MppsStatus.IN_PROGRESS:
        return
    target = OrderStatus.COMPLETED
    if mpps.status is MppsStatus.DISCONTINUED:
        reasons = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or []
        codes = {str(r.get("CodeValue", "")) for r in reasons}
        # The operator picked the wrong entry: the step is still to be done.
        target = (OrderStatus.SCHEDULED if INCORRECT_WORKLIST_ENTRY in codes
                  else OrderStatus.DISCONTINUED)
    for order_id in mpps.order_ids:
        order = tx.get_order(order_id)
        if order is not None and order.status in (OrderStatus.SCHEDULED,
                                                  OrderStatus.IN_PROGRESS):
            tx.put_order(order.model_copy(update={"status": target, "updated_at": now()}))
            tx.audit(f"order.{target.value.lower()}", "success", actor="worklist",
                     subject=f"order:{order_id}", detail=f"mpps={mpps.sop_instance_uid}")


def mpps_summary(mpps: MppsInstance) -> dict[str, object]:
    """A JSON-friendly view of a step (for the API)."""
    return {
        "sop_instance_uid": mpps.sop_instance_uid,
        "status": mpps.status.value,
        "study_instance_uid": mpps.study_instance_uid,
        "accession_number": mpps.accession_number,
        "order_ids": list(mpps.order_ids),
        "performed_instances": len(mpps.performed),
        "attributes": json.loads(mpps.attributes_json),
    }
