"""Binding images to orders, the reconciliation queue, and study completeness.

``bind_instance`` consumes ``instance.indexed``: the instance's Accession Number,
Patient ID and Study Instance UID are checked against the orders. A match
records the binding (design invariant 6); anything else leaves the instance
stored and puts its study in the reconciliation queue (invariant 5).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from vna.events import Event, InstanceIndexed, StudyComplete
from vna.ports import Index
from vna.worklist.model import (
    AuditRecord,
    Binding,
    MppsStatus,
    Order,
    OrderStatus,
    ReconciliationItem,
    ReconciliationStatus,
    now,
)
from vna.worklist.orders import OrderError, OrderErrorKind
from vna.worklist.ports import IndexCorrections, WorklistStore, WorklistTx

log = logging.getLogger("vna.worklist.binding")

_ACCESSION, _PATIENT_ID, _ISSUER = "00080050", "00100020", "00100021"


def _json_value(attrs: Mapping[str, Any], tag: str) -> str:
    values = attrs.get(tag, {}).get("Value") or []
    return str(values[0]) if values else ""


def bind_instance(event: Event, *, store: WorklistStore, index: Index) -> None:
    """Check one indexed instance against the orders; redelivery changes nothing."""
    bind_instances([event], store=store, index=index)


def bind_instances(events: list[Event], *, store: WorklistStore, index: Index) -> None:
    """``bind_instance`` for a batch: the orders are checked once for each distinct
    (study, accession, patient) in it, and completeness once for each study."""
    seen: dict[tuple[str, str, str, str], None] = {}
    for event in events:
        if not isinstance(event, InstanceIndexed):
            continue
        values = _binding_values(event, index)
        if values is not None:
            seen.setdefault((event.study_instance_uid, *values), None)
    if not seen:
        return
    studies = list(dict.fromkeys(key[0] for key in seen))
    # Nearly always each study was bound or queued by its first instance, and there
    # is nothing to write: the whole batch is decided in one reading transaction,
    # without the write lock that (SQLite) every receiver's claim waits for. A
    # batch may hold instances of many studies: held studies and finished MPPS
    # are asked for all of them at once.
    undecided: list[tuple[str, str, str, str]] = []
    with store.reading() as reading:
        held = reading.held_for_reconciliation(studies)
        with_mpps = reading.studies_with_completed_mpps(studies)
        for key in seen:
            study, accession, patient_id, issuer = key
            if study in held:
                continue  # bind_study would leave it as it is
            try:
                bind_study(study, accession_number=accession, patient_id=patient_id,
                           issuer_of_patient_id=issuer, tx=_ReadingTx(reading, held))
            except _NeedsWrite:
                undecided.append(key)
    for study, accession, patient_id, issuer in undecided:
        with store.transaction() as tx:  # decided again: it may have changed since
            bind_study(study, accession_number=accession, patient_id=patient_id,
                       issuer_of_patient_id=issuer, tx=tx)
    for study in studies:
        if study in with_mpps:  # else nothing can be complete yet (MPPS checks on its own)
            check_study_complete(study, store=store, index=index)


class BindingTx(Protocol):
    """What ``bind_study`` reads and writes of a worklist transaction."""

    def held_for_reconciliation(self, study_instance_uids: Collection[str]) -> set[str]: ...

    def bindings(self, *, study_instance_uid: str | None = None,
                 order_id: str | None = None) -> list[Binding]: ...

    def find_orders(self, *, accession_number: str | None = None,
                    study_instance_uid: str | None = None) -> list[Order]: ...

    def put_binding(self, binding: Binding) -> bool: ...

    def put_reconciliation(self, item: ReconciliationItem) -> None: ...

    def audit(self, action: str, outcome: str, *, actor: str = "", subject: str = "",
              detail: str = "") -> AuditRecord: ...


class _NeedsWrite(Exception):
    """``bind_study`` would write: decide again in a write transaction."""


class _ReadingTx:
    """A ``BindingTx`` over the batch's reading transaction: it reads, and stops at
    the first write ``bind_study`` would make. What the batch already read (its
    held studies, a study's bindings) is answered from that, not read again: a
    binding already recorded is answered as the write transaction would (False)."""

    def __init__(self, tx: WorklistTx, held: set[str]) -> None:
        self._tx = tx
        self._held = held
        self._bound: dict[str, list[Binding]] = {}

    def held_for_reconciliation(self, study_instance_uids: Collection[str]) -> set[str]:
        return self._held.intersection(study_instance_uids)

    def bindings(self, *, study_instance_uid: str | None = None,
                 order_id: str | None = None) -> list[Binding]:
        found = self._tx.bindings(study_instance_uid=study_instance_uid, order_id=order_id)
        if study_instance_uid is not None and order_id is None:
            self._bound[study_instance_uid] = found
        return found

    def find_orders(self, *, accession_number: str | None = None,
                    study_instance_uid: str | None = None) -> list[Order]:
        return self._tx.find_orders(accession_number=accession_number,
                                    study_instance_uid=study_instance_uid)

    def put_binding(self, binding: Binding) -> bool:
        bound = self._bound.get(binding.study_instance_uid)
        if bound is None:
            bound = self.bindings(study_instance_uid=binding.study_instance_uid)
        if any(b.order_id == binding.order_id for b in bound):
            return False
        raise _NeedsWrite

    def put_reconciliation(self, item: ReconciliationItem) -> None:
        raise _NeedsWrite

    def audit(self, action: str, outcome: str, *, actor: str = "", subject: str = "",
              detail: str = "") -> AuditRecord:
        raise _NeedsWrite


def _binding_values(event: InstanceIndexed, index: Index) -> tuple[str, str, str] | None:
    """(accession, patient id, issuer) as indexed: from the event, or the index."""
    if event.patient_id is not None and event.accession_number is not None:
        return (event.accession_number, event.patient_id, event.issuer_of_patient_id or "")
    found = index.metadata(event.study_instance_uid, event.series_instance_uid,
                           event.sop_instance_uid)
    if not found:
        log.warning("indexed instance has no metadata; not bound",
                    extra={"sop_instance_uid": event.sop_instance_uid})
        return None
    attrs = json.loads(found[0])
    return (_json_value(attrs, _ACCESSION), _json_value(attrs, _PATIENT_ID),
            _json_value(attrs, _ISSUER))


def _mismatch(order: Order, accession_number: str, patient_id: str, issuer: str) -> str:
    """Why images with these values do not belong to ``order`` ('' when they do)."""
    if patient_id != order.patient_id or (
            issuer and order.issuer_of_patient_id and issuer != order.issuer_of_patient_id):
        return "Patient ID differs from the order's"
    if accession_number and accession_number != order.accession_number:
        return "Accession Number differs from the order's"
    if order.status is OrderStatus.CANCELLED:
        return "the order was cancelled"
    return ""


def bind_study(study_instance_uid: str, *, accession_number: str, patient_id: str,
               issuer_of_patient_id: str, tx: BindingTx) -> Binding | ReconciliationItem | None:
    """Bind the study to its order, or queue it for reconciliation; None if already done."""
    if tx.held_for_reconciliation([study_instance_uid]):
        # A person decides, or decided; the instance's own header stays as received.
        return None
    bound = tx.bindings(study_instance_uid=study_instance_uid)
    candidates = tx.find_orders(study_instance_uid=study_instance_uid)
    if not candidates and accession_number:
        # The modality made its own Study Instance UID: the accession still binds it.
        candidates = tx.find_orders(accession_number=accession_number)
    reasons = []
    for order in candidates:
        reason = _mismatch(order, accession_number, patient_id, issuer_of_patient_id)
        if reason:
            reasons.append(reason)
            continue
        binding = Binding(study_instance_uid=study_instance_uid, order_id=order.order_id,
                          accession_number=order.accession_number,
                          patient_id=order.patient_id,
                          issuer_of_patient_id=order.issuer_of_patient_id)
        if tx.put_binding(binding):
            tx.audit("study.bound", "success", actor="worklist",
                     subject=f"study:{study_instance_uid}", detail=f"order={order.order_id}")
            return binding
        return None
    if bound and not reasons:
        return None
    item = ReconciliationItem(
        item_id=uuid.uuid4().hex,
        study_instance_uid=study_instance_uid,
        reason=reasons[0] if reasons else "no order for this study or accession number",
        patient_id=patient_id,
        issuer_of_patient_id=issuer_of_patient_id,
        accession_number=accession_number,
    )
    tx.put_reconciliation(item)
    tx.audit("reconciliation.opened", "success", actor="worklist",
             subject=f"study:{study_instance_uid}", detail=item.reason)
    log.info("study queued for reconciliation", extra={"item_id": item.item_id})
    return item


def check_study_complete(study_instance_uid: str, *, store: WorklistStore, index: Index) -> bool:
    """Publish ``study.complete`` once every instance the study's completed MPPS list is
    indexed; True when it was published by this call."""
    with store.reading() as tx:
        steps = [m for m in tx.mpps_for_study(study_instance_uid)
                 if m.status is MppsStatus.COMPLETED]
    expected = {p.sop_instance_uid for m in steps for p in m.performed}
    if not expected:
        return False
    present = {i.ref.sop_instance_uid
               for i in index.instances(study_instance_uid=study_instance_uid)}
    if not expected <= present:
        return False
    with store.transaction() as tx:
        if not tx.mark_study_complete(study_instance_uid):
            return False
        tx.emit(StudyComplete(
            study_instance_uid=study_instance_uid,
            accession_number=steps[0].accession_number,
            mpps_sop_instance_uids=tuple(m.sop_instance_uid for m in steps),
            instance_count=len(expected),
        ))
        tx.audit("study.complete", "success", actor="worklist",
                 subject=f"study:{study_instance_uid}", detail=f"instances={len(expected)}")
    return True


# ------------------------------------------------------------------ reconciliation
def link_study(item_id: str, order_id: str, *, store: WorklistStore,
               corrections: IndexCorrections | None, actor: str) -> ReconciliationItem:
    """Resolve an item by binding its study to ``order_id``.

    The study's patient and order attributes are corrected in the index as a new
    metadata version first (the bytes stay pristine); then, in one worklist
    transaction, the binding is recorded and the item closed. Without an index
    that can correct, the item is closed with the correction noted as pending.
    """
    with store.transaction() as tx:
        item, order = _open_item_and_order(item_id, order_id, tx)
        patient = tx.get_patient(order.patient_id, order.issuer_of_patient_id)
    changes = {
        "PatientID": order.patient_id,
        "IssuerOfPatientID": order.issuer_of_patient_id,
        "AccessionNumber": order.accession_number,
    }
    if patient is not None:
        # What the RIS does not know is not erased from the images.
        demographics = {"PatientName": patient.patient_name,
                        "PatientBirthDate": patient.patient_birth_date,
                        "PatientSex": patient.patient_sex}
        changes.update({k: v for k, v in demographics.items() if v})
    version = ""
    if corrections is not None:
        version = corrections.correct_study(item.study_instance_uid, changes,
                                            reason=f"reconciliation {item_id}", actor=actor)
    with store.transaction() as tx:
        item, order = _open_item_and_order(item_id, order_id, tx)
        tx.put_binding(Binding(study_instance_uid=item.study_instance_uid,
                               order_id=order.order_id, accession_number=order.accession_number,
                               patient_id=order.patient_id,
                               issuer_of_patient_id=order.issuer_of_patient_id,
                               how="reconciled"))
        note = f"index version {version}" if version else "index correction pending"
        resolved = item.model_copy(update={
            "status": ReconciliationStatus.LINKED, "order_id": order.order_id,
            "resolved_by": actor, "resolved_at": now(), "note": note})
        tx.put_reconciliation(resolved)
        tx.audit("reconciliation.linked", "success", actor=actor,
                 subject=f"study:{item.study_instance_uid}",
                 detail=f"item={item_id} order={order.order_id} {note}")
    return resolved


def reject_study(item_id: str, *, store: WorklistStore, actor: str, note: str = ""
                 ) -> ReconciliationItem:
    """Resolve an item without an order: the images stay stored, unbound."""
    with store.transaction() as tx:
        item = tx.get_reconciliation(item_id)
        if item is None:
            raise OrderError(OrderErrorKind.UNKNOWN, "no such reconciliation item")
        if item.status is not ReconciliationStatus.OPEN:
            raise OrderError(OrderErrorKind.CONFLICT, f"item is already {item.status.value}")
        resolved = item.model_copy(update={
            "status": ReconciliationStatus.REJECTED, "resolved_by": actor,
            "resolved_at": now(), "note": note})
        tx.put_reconciliation(resolved)
        tx.audit("reconciliation.rejected", "success", actor=actor,
                 subject=f"study:{item.study_instance_uid}", detail=f"item={item_id}")
    return resolved


def _open_item_and_order(item_id: str, order_id: str, tx: WorklistTx
                         ) -> tuple[ReconciliationItem, Order]:
    item = tx.get_reconciliation(item_id)
    if item is None:
        raise OrderError(OrderErrorKind.UNKNOWN, "no such reconciliation item")
    if item.status is not ReconciliationStatus.OPEN:
        raise OrderError(OrderErrorKind.CONFLICT, f"item is already {item.status.value}")
    order = tx.get_order(order_id)
    if order is None:
        raise OrderError(OrderErrorKind.UNKNOWN, "no such order")
    if order.status is OrderStatus.CANCELLED:
        raise OrderError(OrderErrorKind.CONFLICT, "order was cancelled")
    return item, order
