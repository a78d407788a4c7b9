"""In-memory ``WorklistStore``: for tests and for a worklist that need not survive restarts."""

from __future__ import annotations

import copy
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vna.audit import chain_hash
from vna.events import Event
from vna.ports import Unavailable
from vna.worklist.model import (
    AuditRecord,
    Binding,
    MppsInstance,
    MppsStatus,
    Order,
    OrderStatus,
    PatientMerge,
    ReconciliationItem,
    ReconciliationStatus,
    RisPatient,
    now,
)


@dataclass
class _State:
    messages: dict[str, tuple[str, str]] = field(default_factory=dict)
    patients: dict[tuple[str, str], RisPatient] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    mpps: dict[str, MppsInstance] = field(default_factory=dict)
    bindings: dict[tuple[str, str], Binding] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)
    reconciliation: dict[str, ReconciliationItem] = field(default_factory=dict)
    merges: dict[str, PatientMerge] = field(default_factory=dict)
    audit: list[AuditRecord] = field(default_factory=list)
    pending_events: list[Event] = field(default_factory=list)


class _MemoryTx:
    def __init__(self, state: _State) -> None:
        self.s = state

    def message_ack(self, control_id: str) -> str | None:
        found = self.s.messages.get(control_id)
        return found[1] if found else None

    def record_message(self, control_id: str, message_type: str, ack_code: str) -> None:
        self.s.messages[control_id] = (message_type, ack_code)

    def get_patient(self, patient_id: str, issuer_of_patient_id: str = "") -> RisPatient | None:
        return self.s.patients.get((patient_id, issuer_of_patient_id))

    def put_patient(self, patient: RisPatient) -> None:
        self.s.patients[(patient.patient_id, patient.issuer_of_patient_id)] = patient

    def get_order(self, order_id: str) -> Order | None:
        return self.s.orders.get(order_id)

    def find_orders(
        self,
        *,
        accession_number: str | None = None,
        placer_order_number: str | None = None,
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
        issuer_of_patient_id: str | None = None,
        statuses: Collection[OrderStatus] | None = None,
    ) -> list[Order]:
        wanted = {
            "accession_number": accession_number,
            "placer_order_number": placer_order_number,
            "study_instance_uid": study_instance_uid,
            "patient_id": patient_id,
            "issuer_of_patient_id": issuer_of_patient_id,
        }
        out = [
            o for o in self.s.orders.values()
            if all(v is None or getattr(o, k) == v for k, v in wanted.items())
            and (statuses is None or o.status in statuses)
        ]
        return sorted(out, key=lambda o: (o.created_at, o.order_id))

    def put_order(self, order: Order) -> None:
        key = (order.accession_number, order.requested_procedure_id,
               order.scheduled_procedure_step_id)
        for other in self.s.orders.values():
            if other.order_id != order.order_id and key == (
                other.accession_number, other.requested_procedure_id,
                other.scheduled_procedure_step_id,
            ):
                raise ValueError("an order with this accession, requested procedure and "
                                 "step already exists")
        self.s.orders[order.order_id] = order

    def get_mpps(self, sop_instance_uid: str) -> MppsInstance | None:
        return self.s.mpps.get(sop_instance_uid)

    def put_mpps(self, mpps: MppsInstance) -> None:
        self.s.mpps[mpps.sop_instance_uid] = mpps

    def mpps_for_study(self, study_instance_uid: str) -> list[MppsInstance]:
        return [m for m in self.s.mpps.values() if m.study_instance_uid == study_instance_uid]

    def studies_with_completed_mpps(self, study_instance_uids: Collection[str]) -> set[str]:
        wanted = set(study_instance_uids)
        return {m.study_instance_uid for m in self.s.mpps.values()
                if m.status is MppsStatus.COMPLETED and m.study_instance_uid in wanted}

    def put_binding(self, binding: Binding) -> bool:
        key = (binding.study_instance_uid, binding.order_id)
        if key in self.s.bindings:
            return False
        self.s.bindings[key] = binding
        return True

    def bindings(
        self, *, study_instance_uid: str | None = None, order_id: str | None = None
    ) -> list[Binding]:
        return [
            b for b in self.s.bindings.values()
            if (study_instance_uid is None or b.study_instance_uid == study_instance_uid)
            and (order_id is None or b.order_id == order_id)
        ]

    def mark_study_complete(self, study_instance_uid: str) -> bool:
        if study_instance_uid in self.s.complete:
            return False
        self.s.complete.add(study_instance_uid)
        return True

    def get_reconciliation(self, item_id: str) -> ReconciliationItem | None:
        return self.s.reconciliation.get(item_id)

    def open_reconciliation(self, study_instance_uid: str) -> ReconciliationItem | None:
        for item in self.s.reconciliation.values():
            if (item.study_instance_uid == study_instance_uid
                    and item.status is ReconciliationStatus.OPEN):
                return item
        return None

    def held_for_reconciliation(self, study_instance_uids: Collection[str]) -> set[str]:
        wanted = set(study_instance_uids)
        held = {i.study_instance_uid for i in self.s.reconciliation.values()
                if i.status is ReconciliationStatus.OPEN}
        held |= {b.study_instance_uid for b in self.s.bindings.values() if b.how == "reconciled"}
        return held & wanted

    def put_reconciliation(self, item: ReconciliationItem) -> None:
        self.s.reconciliation[item.item_id] = item

    def reconciliations(
        self, status: ReconciliationStatus | None = None
    ) -> list[ReconciliationItem]:
        items = [i for i in self.s.reconciliation.values() if status is None or i.status is status]
        return sorted(items, key=lambda i: (i.created_at, i.item_id))

    def get_merge(self, merge_id: str) -> PatientMerge | None:
        return self.s.merges.get(merge_id)

    def put_merge(self, merge: PatientMerge) -> None:
        self.s.merges[merge.merge_id] = merge

    def audit(
        self, action: str, outcome: str, *, actor: str = "", subject: str = "", detail: str = ""
    ) -> AuditRecord:
        prev = self.s.audit[-1].hash if self.s.audit else ""
        at = now()
        record = AuditRecord(
            at=at, action=action, outcome=outcome, actor=actor, subject=subject, detail=detail,
            prev_hash=prev, hash=chain_hash(prev, at, action, outcome, actor, subject, detail),
        )
        self.s.audit.append(record)
        return record

    def audit_trail(self, subject: str | None = None) -> list[AuditRecord]:
        return [r for r in self.s.audit if subject is None or r.subject == subject]

    def emit(self, event: Event) -> None:
        self.s.pending_events.append(event)


class MemoryWorklistStore:
    """Copy-on-write state under a lock: a transaction that raises leaves nothing behind."""

    def __init__(self) -> None:
        self._state = _State()
        self._lock = threading.RLock()
        self.events: list[Event] = []
        """Events emitted by committed transactions, in order (what the outbox would relay)."""
        self.available = True

    @contextmanager
    def transaction(self) -> Iterator[_MemoryTx]:
        if not self.available:
            raise Unavailable("worklist store is unavailable")
        with self._lock:
            work = copy.deepcopy(self._state)
            work.pending_events = []
            yield _MemoryTx(work)
            self.events.extend(work.pending_events)
            work.pending_events = []
            self._state = work

    @contextmanager
    def reading(self) -> Iterator[_MemoryTx]:
        if not self.available:
            raise Unavailable("worklist store is unavailable")
        with self._lock:
            yield _MemoryTx(self._state)  # the state as committed; nothing is written

    def check(self) -> None:
        if not self.available:
            raise Unavailable("worklist store is unavailable")

    def close(self) -> None:
        return None
