"""Ports of the worklist: its store, and what it needs the archive's index to do.

All of one HL7 message, one DIMSE request or one API call is applied inside
one ``WorklistStore.transaction()``: either all of it is kept or none of it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from vna.audit import chain_hash
from vna.events import Event
from vna.worklist.model import (
    AuditRecord,
    Binding,
    MppsInstance,
    Order,
    OrderStatus,
    PatientMerge,
    ReconciliationItem,
    ReconciliationStatus,
    RisPatient,
)


class WorklistTx(Protocol):
    """What can be read and written inside one worklist transaction."""

    # ---- HL7 messages already applied (MSH-10), for exactly-once application
    def message_ack(self, control_id: str) -> str | None:
        """The acknowledgment code given to ``control_id`` when it was applied, or None."""
        ...

    def record_message(self, control_id: str, message_type: str, ack_code: str) -> None: ...

    # ---- patients as known by the RIS
    def get_patient(self, patient_id: str, issuer_of_patient_id: str = "") -> RisPatient | None: ...

    def put_patient(self, patient: RisPatient) -> None: ...

    # ---- orders (requested procedure + scheduled procedure step)
    def get_order(self, order_id: str) -> Order | None: ...

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
        """Orders matching every given criterion (exact values), oldest first."""
        ...

    def put_order(self, order: Order) -> None:
        """Insert or replace by ``order_id``; (accession, requested procedure, step) is unique."""
        ...

    # ---- MPPS
    def get_mpps(self, sop_instance_uid: str) -> MppsInstance | None: ...

    def put_mpps(self, mpps: MppsInstance) -> None: ...

    def mpps_for_study(self, study_instance_uid: str) -> list[MppsInstance]: ...

    def studies_with_completed_mpps(self, study_instance_uids: Collection[str]) -> set[str]:
        """Those of these studies that a COMPLETED MPPS names (one look for a batch)."""
        ...

    # ---- bindings and study completeness
    def put_binding(self, binding: Binding) -> bool:
        """Record ``binding``; False when that study was already bound to that order."""
        ...

    def bindings(
        self, *, study_instance_uid: str | None = None, order_id: str | None = None
    ) -> list[Binding]: ...

    def mark_study_complete(self, study_instance_uid: str) -> bool:
        """True the first time only: ``study.complete`` is published once."""
        ...

    # ---- reconciliation
    def get_reconciliation(self, item_id: str) -> ReconciliationItem | None: ...

    def open_reconciliation(self, study_instance_uid: str) -> ReconciliationItem | None:
        """The study's OPEN item, if it has one."""
        ...

    def held_for_reconciliation(self, study_instance_uids: Collection[str]) -> set[str]:
        """Those of these studies that an OPEN item holds in the reconciliation queue,
        or that a person bound (a 'reconciled' binding): new images of them change
        nothing (``bind_study``). One look for a batch."""
        ...

    def put_reconciliation(self, item: ReconciliationItem) -> None: ...

    def reconciliations(
        self, status: ReconciliationStatus | None = None
    ) -> list[ReconciliationItem]: ...

    # ---- patient merges
    def get_merge(self, merge_id: str) -> PatientMerge | None: ...

    def put_merge(self, merge: PatientMerge) -> None: ...

    # ---- audit and events
    def audit(
        self, action: str, outcome: str, *, actor: str = "", subject: str = "", detail: str = ""
    ) -> AuditRecord:
        """Append to the hash-chained audit trail, in this transaction."""
        ...

    def audit_trail(self, subject: str | None = None) -> list[AuditRecord]: ...

    def emit(self, event: Event) -> None:
        """Publish ``event`` once this transaction commits (transactional outbox)."""
        ...


class WorklistStore(Protocol):
    def transaction(self) -> AbstractContextManager[WorklistTx]:
        """One atomic unit: committed when the block ends, rolled back if it raises."""
        ...

    def reading(self) -> AbstractContextManager[WorklistTx]:
        """A consistent view for reads only, taking no write lock: for the checks that
        nearly always find nothing to change (what the binder does per instance).
        Nothing may be written through it."""
        ...

    def check(self) -> None: ...

    def close(self) -> None: ...


class IndexCorrections(Protocol):
    """What the worklist needs the archive's index to do (implemented by the index).

    Both write a new metadata version: the stored bytes are never touched, the
    previous version stays retrievable, queries show the corrected values.
    """

    def correct_study(
        self, study_instance_uid: str, changes: Mapping[str, str], *, reason: str, actor: str
    ) -> str:
        """Set patient/order attributes (DICOM keywords -> values) on every instance
        of the study as a new metadata version; returns a version reference."""
        ...

    def merge_patients(
        self,
        prior_patient_id: str,
        prior_issuer_of_patient_id: str,
        patient_id: str,
        issuer_of_patient_id: str,
        *,
        actor: str,
    ) -> str:
        """Move the prior patient's studies under the surviving patient; returns a
        reference that ``unmerge_patients`` undoes."""
        ...

    def unmerge_patients(self, merge_ref: str, *, actor: str) -> None: ...


def verify_chain(records: list[AuditRecord]) -> bool:
    """True when every record's hash is intact and links to its predecessor."""
    prev = ""
    for r in records:
        if r.prev_hash != prev or r.hash != chain_hash(
            r.prev_hash, r.at, r.action, r.outcome, r.actor, r.subject, r.detail
        ):
            return False
        prev = r.hash
    return True
