"""``WorklistStore`` on SQLite or PostgreSQL (SQLAlchemy Core), in the index's database.

One worklist transaction is one database transaction: the worklist rows, the
audit records (the index's hash-chained ``audit`` table) and the events (the
index's ``outbox``, drained by the archive's relay) commit together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select, text, union
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import SQLAlchemyError as _SAError

from vna.adapters.index.schema import audit, outbox
from vna.adapters.index.sqlalchemy import (
    SqlIndex,
    SqliteWriteLock,
    WriteTransaction,
    make_engine,
    migrate,
)
from vna.adapters.index.wal import WalSync
from vna.adapters.index.worklist_schema import (
    wl_bindings,
    wl_complete_studies,
    wl_merges,
    wl_messages,
    wl_mpps,
    wl_orders,
    wl_patients,
    wl_reconciliation,
)
from vna.audit import chain_hash
from vna.events import Event, encode_event
from vna.ports import Unavailable
from vna.worklist.model import (
    AuditRecord,
    Binding,
    CodedEntry,
    MppsInstance,
    MppsStatus,
    Order,
    OrderStatus,
    PatientMerge,
    PerformedInstance,
    ReconciliationItem,
    ReconciliationStatus,
    RisPatient,
    now,
)

_AUDIT_LOCK = 74212
"""The advisory lock the index takes to append to the audit chain (PostgreSQL)."""


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything VNA writes is UTC.
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class SqlWorklistTx:
    def __init__(self, conn: Connection, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    def _upsert(self, table: Any, values: dict[str, Any], keys: list[str]) -> None:
        insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)
        stmt = insert.values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=keys,
            set_={k: stmt.excluded[k] for k in values if k not in keys},
        )
        self.conn.execute(stmt)

    # ---- messages
    def message_ack(self, control_id: str) -> str | None:
        row = self.conn.execute(select(wl_messages.c.ack_code)
                                .where(wl_messages.c.message_key == control_id)).first()
        return str(row.ack_code) if row else None

    def record_message(self, control_id: str, message_type: str, ack_code: str) -> None:
        self.conn.execute(wl_messages.insert().values(
            message_key=control_id, message_type=message_type, ack_code=ack_code,
            received_at=now()))

    # ---- patients
    def get_patient(self, patient_id: str, issuer_of_patient_id: str = "") -> RisPatient | None:
        row = self.conn.execute(select(wl_patients).where(
            wl_patients.c.patient_id == patient_id,
            wl_patients.c.issuer_of_patient_id == issuer_of_patient_id)).mappings().first()
        if row is None:
            return None
        return RisPatient.model_validate({**row, "updated_at": _aware(row["updated_at"])})

    def put_patient(self, patient: RisPatient) -> None:
        self._upsert(wl_patients, patient.model_dump(),
                     ["patient_id", "issuer_of_patient_id"])

    # ---- orders
    def get_order(self, order_id: str) -> Order | None:
        row = self.conn.execute(select(wl_orders).where(wl_orders.c.order_id == order_id)
                                ).mappings().first()
        return _order(row) if row else None

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
        stmt = select(wl_orders).order_by(wl_orders.c.created_at, wl_orders.c.order_id)
        for column, value in (
            (wl_orders.c.accession_number, accession_number),
            (wl_orders.c.placer_order_number, placer_order_number),
            (wl_orders.c.study_instance_uid, study_instance_uid),
            (wl_orders.c.patient_id, patient_id),
            (wl_orders.c.issuer_of_patient_id, issuer_of_patient_id),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        if statuses is not None:
            stmt = stmt.where(wl_orders.c.status.in_([s.value for s in statuses]))
        return [_order(r) for r in self.conn.execute(stmt).mappings()]

    def put_order(self, order: Order) -> None:
        data = order.model_dump(exclude={"requested_procedure_code"})
        code = order.requested_procedure_code or CodedEntry()
        data.update(
            status=order.status.value,
            requested_procedure_code_value=code.code_value,
            requested_procedure_coding_scheme=code.coding_scheme_designator,
            requested_procedure_code_meaning=code.code_meaning,
        )
        try:
            with self.conn.begin_nested():
                self._upsert(wl_orders, data, ["order_id"])
        except IntegrityError as exc:
            raise ValueError("an order with this accession, requested procedure and step "
                             "already exists") from exc

    # ---- MPPS
    def get_mpps(self, sop_instance_uid: str) -> MppsInstance | None:
        row = self.conn.execute(select(wl_mpps).where(
            wl_mpps.c.sop_instance_uid == sop_instance_uid)).mappings().first()
        return _mpps(row) if row else None

    def put_mpps(self, mpps: MppsInstance) -> None:
        data = mpps.model_dump(exclude={"order_ids", "performed"})
        data.update(
            status=mpps.status.value,
            order_ids=json.dumps(list(mpps.order_ids)),
            performed=json.dumps([p.model_dump() for p in mpps.performed]),
        )
        self._upsert(wl_mpps, data, ["sop_instance_uid"])

    def mpps_for_study(self, study_instance_uid: str) -> list[MppsInstance]:
        rows = self.conn.execute(select(wl_mpps).where(
            wl_mpps.c.study_instance_uid == study_instance_uid)
            .order_by(wl_mpps.c.created_at)).mappings()
        return [_mpps(r) for r in rows]

    def studies_with_completed_mpps(self, study_instance_uids: Collection[str]) -> set[str]:
        return set(self.conn.execute(
            select(wl_mpps.c.study_instance_uid).distinct().where(
                wl_mpps.c.study_instance_uid.in_(list(study_instance_uids)),
                wl_mpps.c.status == MppsStatus.COMPLETED.value)).scalars())

    # ---- bindings
    def put_binding(self, binding: Binding) -> bool:
        insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(
            wl_bindings)
        # RETURNING, not rowcount: drivers disagree on rowcount after DO NOTHING.
        row = self.conn.execute(insert.values(**binding.model_dump()).on_conflict_do_nothing()
                                .returning(wl_bindings.c.order_id)).first()
        return row is not None

    def bindings(
        self, *, study_instance_uid: str | None = None, order_id: str | None = None
    ) -> list[Binding]:
        stmt = select(wl_bindings).order_by(wl_bindings.c.bound_at)
        if study_instance_uid is not None:
            stmt = stmt.where(wl_bindings.c.study_instance_uid == study_instance_uid)
        if order_id is not None:
            stmt = stmt.where(wl_bindings.c.order_id == order_id)
        return [Binding.model_validate({**r, "bound_at": _aware(r["bound_at"])})
                for r in self.conn.execute(stmt).mappings()]

    def mark_study_complete(self, study_instance_uid: str) -> bool:
        insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(
            wl_complete_studies)
        row = self.conn.execute(insert.values(
            study_instance_uid=study_instance_uid, completed_at=now()).on_conflict_do_nothing()
            .returning(wl_complete_studies.c.study_instance_uid)).first()
        return row is not None

    # ---- reconciliation
    def get_reconciliation(self, item_id: str) -> ReconciliationItem | None:
        row = self.conn.execute(select(wl_reconciliation).where(
            wl_reconciliation.c.item_id == item_id)).mappings().first()
        return _item(row) if row else None

    def open_reconciliation(self, study_instance_uid: str) -> ReconciliationItem | None:
        row = self.conn.execute(select(wl_reconciliation).where(
            wl_reconciliation.c.study_instance_uid == study_instance_uid,
            wl_reconciliation.c.status == ReconciliationStatus.OPEN.value)).mappings().first()
        return _item(row) if row else None

    def held_for_reconciliation(self, study_instance_uids: Collection[str]) -> set[str]:
        wanted = list(study_instance_uids)
        waiting = select(wl_reconciliation.c.study_instance_uid).where(
            wl_reconciliation.c.study_instance_uid.in_(wanted),
            wl_reconciliation.c.status == ReconciliationStatus.OPEN.value)
        decided = select(wl_bindings.c.study_instance_uid).where(
            wl_bindings.c.study_instance_uid.in_(wanted), wl_bindings.c.how == "reconciled")
        return set(self.conn.execute(union(waiting, decided)).scalars())

    def put_reconciliation(self, item: ReconciliationItem) -> None:
        self._upsert(wl_reconciliation, {**item.model_dump(), "status": item.status.value},
                     ["item_id"])

    def reconciliations(
        self, status: ReconciliationStatus | None = None
    ) -> list[ReconciliationItem]:
        stmt = select(wl_reconciliation).order_by(wl_reconciliation.c.created_at,
                                                  wl_reconciliation.c.item_id)
        if status is not None:
            stmt = stmt.where(wl_reconciliation.c.status == status.value)
        return [_item(r) for r in self.conn.execute(stmt).mappings()]

    # ---- merges
    def get_merge(self, merge_id: str) -> PatientMerge | None:
        row = self.conn.execute(select(wl_merges).where(wl_merges.c.merge_id == merge_id)
                                ).mappings().first()
        if row is None:
            return None
        return PatientMerge.model_validate({
            **row, "moved_order_ids": tuple(json.loads(row["moved_order_ids"])),
            "merged_at": _aware(row["merged_at"]), "undone_at": _aware(row["undone_at"])})

    def put_merge(self, merge: PatientMerge) -> None:
        self._upsert(wl_merges, {**merge.model_dump(),
                                 "moved_order_ids": json.dumps(list(merge.moved_order_ids))},
                     ["merge_id"])

    # ---- audit and events
    def audit(
        self, action: str, outcome: str, *, actor: str = "", subject: str = "", detail: str = ""
    ) -> AuditRecord:
        if self.dialect == "postgresql":
            self.conn.execute(text(f"SELECT pg_advisory_xact_lock({_AUDIT_LOCK})"))
        prev = self.conn.execute(select(audit.c.hash).order_by(audit.c.id.desc()).limit(1)
                                 ).scalar() or ""
        at = now()
        digest = chain_hash(prev, at, action, outcome, actor, subject, detail)
        self.conn.execute(audit.insert().values(
            at=at, action=action, outcome=outcome, actor=actor, subject=subject, detail=detail,
            prev_hash=prev, hash=digest))
        return AuditRecord(at=at, action=action, outcome=outcome, actor=actor, subject=subject,
                           detail=detail, prev_hash=prev, hash=digest)

    def audit_trail(self, subject: str | None = None) -> list[AuditRecord]:
        stmt = select(audit).order_by(audit.c.id)
        if subject is not None:
            stmt = stmt.where(audit.c.subject == subject)
        return [AuditRecord(at=_aware(r.at) or now(), action=r.action, outcome=r.outcome,
                            actor=r.actor, subject=r.subject, detail=r.detail,
                            prev_hash=r.prev_hash, hash=r.hash)
                for r in self.conn.execute(stmt)]

    def emit(self, event: Event) -> None:
        self.conn.execute(outbox.insert().values(
            routing_key=event.routing_key, payload=encode_event(event), created_at=now(),
            attempts=0))


def _order(row: RowMapping) -> Order:
    data = dict(row)
    code = CodedEntry(
        code_value=data.pop("requested_procedure_code_value"),
        coding_scheme_designator=data.pop("requested_procedure_coding_scheme"),
        code_meaning=data.pop("requested_procedure_code_meaning"),
    )
    data["requested_procedure_code"] = code if code.code_value else None
    data["created_at"] = _aware(data["created_at"])
    data["updated_at"] = _aware(data["updated_at"])
    return Order.model_validate(data)


def _mpps(row: RowMapping) -> MppsInstance:
    data = dict(row)
    data["status"] = MppsStatus(data["status"])
    data["order_ids"] = tuple(json.loads(data["order_ids"]))
    data["performed"] = tuple(PerformedInstance.model_validate(p)
                              for p in json.loads(data["performed"]))
    data["created_at"] = _aware(data["created_at"])
    data["updated_at"] = _aware(data["updated_at"])
    return MppsInstance.model_validate(data)


def _item(row: RowMapping) -> ReconciliationItem:
    data = dict(row)
    data["created_at"] = _aware(data["created_at"])
    data["resolved_at"] = _aware(data["resolved_at"])
    return ReconciliationItem.model_validate(data)


class SqlWorklistStore:
    """``WorklistStore`` over SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, index: SqlIndex | None = None,
                 owns_engine: bool = False) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite has one writer: beside the index, write as it does (its lock, its
        # WAL sync); alone, with a lock and a sync of its own.
        self._index = index
        self._own_lock = SqliteWriteLock(engine) if index is None else None
        self._own_wal = WalSync(engine) if index is None else None
        self._owns_engine = owns_engine

    @classmethod
    def from_url(cls, url: str, *, run_migrations: bool = True) -> SqlWorklistStore:
        engine = make_engine(url)
        try:
            if run_migrations:
                migrate(engine)
        except _SAError as exc:
            raise Unavailable(f"worklist database: {exc}") from exc
        return cls(engine, owns_engine=True)

    @classmethod
    def beside(cls, index: SqlIndex) -> SqlWorklistStore:
        """The worklist in the database of ``index``, sharing its engine and its writes."""
        return cls(index.engine, index=index)

    @contextmanager
    def transaction(self) -> Iterator[SqlWorklistTx]:
        """A write transaction; on an SQLite file committed under the write lock it
        shares with the index and synced after it (``WriteTransaction``)."""
        name = "worklist database"
        if self._index is not None:
            writing = self._index.write_transaction(name=name)
        else:
            assert self._own_wal is not None
            lock = self._own_lock if self.dialect == "sqlite" else None
            writing = WriteTransaction(self.engine, lock, self._own_wal, name=name)
        try:
            with writing as conn:
                yield SqlWorklistTx(conn, self.dialect)
        except _SAError as exc:
            raise Unavailable(f"worklist database: {exc}") from exc

    @contextmanager
    def reading(self) -> Iterator[SqlWorklistTx]:
        """A read transaction: SQLite's deferred BEGIN (a snapshot of the WAL, no
        write lock), rolled back at the end."""
        try:
            conn = self.engine.connect()
        except _SAError as exc:
            raise Unavailable(f"worklist database: {exc}") from exc
        try:
            try:
                tx = conn.begin()
            except _SAError as exc:
                raise Unavailable(f"worklist database: {exc}") from exc
            try:
                yield SqlWorklistTx(conn, self.dialect)
            except _SAError as exc:
                raise Unavailable(f"worklist database: {exc}") from exc
            finally:
                tx.rollback()
        finally:
            conn.close()

    def check(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(func.count()).select_from(wl_orders).limit(1))
        except _SAError as exc:
            raise Unavailable(f"worklist database: {exc}") from exc

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()
        if self._own_lock is not None:
            self._own_lock.close()
        if self._own_wal is not None:
            self._own_wal.close()
