"""The index on SQLite (embedded) or PostgreSQL (distributed), via SQLAlchemy Core.

The only module that writes SQL for the archive core. Queries arrive as
backend-neutral ``vna.dicom.matching.Query`` objects and are translated here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from sqlite3 import Error as _DriverError
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    distinct,
    event,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import SQLAlchemyError as _SAError

from vna.adapters.index import corrections, extra, sequences
from vna.adapters.index.conditions import text_condition, text_form, text_params
from vna.adapters.index.schema import (
    audit,
    claims,
    column_name,
    commitment_requests,
    instances,
    outbox,
    patients,
    series,
    studies,
    study_patients,
)
from vna.adapters.index.wal import FileLock, WalSync
from vna.audit import chain_hash
from vna.dicom.corrections import apply_to_json
from vna.dicom.extended import ExtraValue
from vna.dicom.header import sequence_items
from vna.dicom.matching import ATTRIBUTES, SEQUENCES, Level, Match, Query, sequence_key
from vna.events import Event, InstanceStored, encode_event
from vna.journal import BlobJournal, JournalEntry
from vna.model import BlobKey, InstanceClaim, InstanceRef, PendingCommitment, StoredInstance
from vna.ports import (
    BackfillState,
    ClaimOutcome,
    ConflictError,
    ConflictKind,
    IndexRecord,
    RecordRefused,
    StoredHeader,
    Unavailable,
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

_TABLE_OF_LEVEL = {
    Level.PATIENT: patients,
    Level.STUDY: studies,
    Level.SERIES: series,
    Level.IMAGE: instances,
}
_UID_COLUMN = {
    "PatientID": patients.c.patient_id,
    "IssuerOfPatientID": patients.c.issuer_of_patient_id,
    "StudyInstanceUID": studies.c.study_instance_uid,
    "SeriesInstanceUID": series.c.series_instance_uid,
    "SOPInstanceUID": instances.c.sop_instance_uid,
}


def _normalise_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def make_engine(url: str) -> Engine:
    """An engine with VNA's connection settings (SQLite: WAL, FULL sync, busy wait)."""
    url = _normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=8,
            max_overflow=16,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (below), so the driver must not.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed claim + outbox event survives power loss (invariant 1).
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            # DICOM matching is case-sensitive (PN is matched on a folded copy).
            cur.execute("PRAGMA case_sensitive_like=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # Writers take the lock up front: a deferred transaction that upgrades
            # from read to write can fail at once with SQLITE_BUSY under contention
            # from another process, instead of waiting.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database ``url`` names when it does not exist yet."""
    url = _normalise_url(url)
    if not url.startswith("postgresql"):
        return
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                 {"n": target.database}).first()
            if not found:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    finally:
        admin.dispose()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic), safely from many processes."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(74211)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


# The store path's statements, built once: building a statement costs more than
# running it, and this runs for every instance received.
_SELECT_CLAIM = select(claims.c.blob_key).where(
    claims.c.sop_instance_uid == bindparam("sop"))
_SELECT_CLAIM_DATASET = select(claims.c.dataset_sha256).where(
    claims.c.sop_instance_uid == bindparam("sop"))
_SELECT_SERIES_STUDY = select(claims.c.study_instance_uid).where(
    claims.c.series_instance_uid == bindparam("series")).limit(1)
# What deciding a claim needs, in one round trip (a NULL: nothing there yet).
_SELECT_CLAIM_CONTEXT = select(
    _SELECT_CLAIM.scalar_subquery().label("blob_key"),
    _SELECT_CLAIM_DATASET.scalar_subquery().label("dataset_sha256"),
    _SELECT_SERIES_STUDY.scalar_subquery().label("series_study"),
    *(select(column).where(study_patients.c.study_instance_uid == bindparam("study"))
      .scalar_subquery().label(f"owner_{column.name}")
      for column in (study_patients.c.patient_id, study_patients.c.issuer_of_patient_id)),
)
_INSERT_STUDY_PATIENT = study_patients.insert()
# WADO-RS metadata's revision look-up, by (series given, instance given).
_SELECT_REVISION = {
    (False, False): select(studies.c.revision).where(
        studies.c.study_instance_uid == bindparam("study")),
    (True, False): select(studies.c.revision).select_from(studies.join(series)).where(
        studies.c.study_instance_uid == bindparam("study"),
        series.c.series_instance_uid == bindparam("series")),
    (False, True): select(studies.c.revision).select_from(
        studies.join(series).join(instances)).where(
        studies.c.study_instance_uid == bindparam("study"),
        instances.c.sop_instance_uid == bindparam("sop")),
    (True, True): select(studies.c.revision).select_from(
        studies.join(series).join(instances)).where(
        studies.c.study_instance_uid == bindparam("study"),
        series.c.series_instance_uid == bindparam("series"),
        instances.c.sop_instance_uid == bindparam("sop")),
}
_CLAIM_ATTEMPTS = 3
_INSERT_CLAIM = claims.insert()
_INSERT_OUTBOX = outbox.insert()


def _now() -> datetime:
    return datetime.now(UTC)


class SqlIndex:
    """``Index`` over SQLAlchemy Core."""

    def __init__(self, engine: Engine, *, journal: BlobJournal | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sqlite_write = SqliteWriteLock(engine)
        self._group_guard = threading.Lock()
        self._group_commit = threading.Lock()
        self._group_pending: list[_PendingClaim] = []
        self._claim_of = _Prepared(_SELECT_CLAIM, engine)
        self._claim_context = _Prepared(_SELECT_CLAIM_CONTEXT, engine)
        self._raw_claim = _RawInsert(claims, engine, [c.name for c in claims.columns])
        self._raw_outbox = _RawInsert(outbox, engine,
                                      ["routing_key", "payload", "created_at", "attempts"])
        self._raw_study_patient = _RawInsert(study_patients, engine,
                                             [c.name for c in study_patients.columns])
        self._store_connections = _DriverConnections(engine)
        self._search_statements: dict[Any, Select[Any]] = {}
        """Search statements by form of query (``_Search.run``)."""
        self._revision_of = {key: _Prepared(stmt, engine)
                             for key, stmt in _SELECT_REVISION.items()}
        self.journal = journal
        """Where corrections and merges are journaled (``vna.journal``); None: nowhere,
        and ``vna reindex`` cannot rebuild them (tests of the index alone)."""

    @classmethod
    def from_url(cls, url: str, *, run_migrations: bool = True,
                 journal: BlobJournal | None = None) -> SqlIndex:
        engine = make_engine(url)
        try:
            if run_migrations:
                migrate(engine)
        except OperationalError as exc:
            raise Unavailable(f"index database: {exc.orig}") from exc
        return cls(engine, journal=journal)

    # ------------------------------------------------------------ helpers
    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def write_transaction(self, *, name: str = "index database") -> WriteTransaction:
        """A write transaction in this index's database (the worklist beside it writes
        through here too). SQLite allows one writer: serialised across processes."""
        return WriteTransaction(self.engine, self._sqlite_write if self.dialect == "sqlite"
                                else None, self._store_connections.wal, name=name)

    # ------------------------------------------------------------ store path
    def claim(self, claim: InstanceClaim, event: InstanceStored) -> ClaimOutcome:
        if self.dialect != "sqlite":
            return self._claim_alone(claim, event)
        # SQLite has one writer, and each commit waits for an fsync: claims that
        # arrive while one commits (several associations, STOW clients) wait for
        # the next commit together (group commit), each in its own savepoint.
        item = _PendingClaim(claim, event)
        with self._group_guard:
            self._group_pending.append(item)
        with self._group_commit:
            if not item.done:
                with self._group_guard:
                    group, self._group_pending = self._group_pending, []
                self._claim_group(group)
        if item.error is not None:
            raise item.error
        if item.outcome is None:  # the leader of its group failed unexpectedly
            raise Unavailable("claim not recorded; retry")
        return item.outcome

    def _claim_group(self, group: list[_PendingClaim]) -> None:
        """One transaction for the group, on the driver's connection (SQLite only:
        every received instance passes here, and SQLAlchemy's per-statement work
        cost more than the statements); each claim in its own savepoint."""
        try:
            with self._sqlite_write, self._store_connections.cursor() as cursor:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    for item in group:
                        self._claim_raw(cursor, item)
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                ticket = self._store_connections.wal.ticket()
            # Outside the write lock: the next writer commits while this syncs.
            self._store_connections.wal.make_durable(ticket)
        except (_SAError, _DriverError, Unavailable, OSError) as exc:
            # Nothing of the group is known durable: every claim answers "retry".
            failure = exc if isinstance(exc, Unavailable) else Unavailable(
                f"index database: {exc}")
            for item in group:
                if not isinstance(item.error, ConflictError):
                    item.error = failure
                    item.outcome = None
        finally:
            for item in group:
                item.done = True

    def _claim_raw(self, cursor: Any, item: _PendingClaim) -> None:
        claim = item.claim
        cursor.execute("SAVEPOINT claim")
        try:
            outcome, new_study = self._decide(
                self._claim_context.first_raw(cursor, sop=claim.sop_instance_uid,
                                              series=claim.series_instance_uid,
                                              study=claim.study_instance_uid), claim)
            if outcome is ClaimOutcome.NEW:
                if new_study:
                    self._raw_study_patient.run(cursor, {
                        "study_instance_uid": claim.study_instance_uid,
                        "patient_id": claim.patient_id,
                        "issuer_of_patient_id": claim.issuer_of_patient_id})
                self._raw_claim.run(cursor, {**item.claim_row, "claimed_at": _now()})
                self._raw_outbox.run(cursor, {
                    "routing_key": item.event.routing_key, "payload": item.payload,
                    "created_at": _now(), "attempts": 0})
            item.outcome = outcome
        except (ConflictError, Unavailable) as exc:
            cursor.execute("ROLLBACK TO claim")
            item.error = exc
        cursor.execute("RELEASE claim")

    def _claim_alone(self, claim: InstanceClaim, event: InstanceStored) -> ClaimOutcome:
        for attempt in range(_CLAIM_ATTEMPTS):
            try:
                with self.write_transaction() as conn:
                    outcome = self._claim(conn, claim)
                    if outcome is ClaimOutcome.NEW:
                        conn.execute(_INSERT_OUTBOX, {
                            "routing_key": event.routing_key, "payload": encode_event(event),
                            "created_at": _now(), "attempts": 0})
                    return outcome
            except (ConflictError, Unavailable):
                raise
            except IntegrityError:
                # A concurrent writer (PostgreSQL) committed the same keys first: the
                # instance itself (then decide against its row), or only the study's
                # first instance (then this one is simply claimed again, now knowing
                # the study's patient).
                with self.engine.connect() as conn:
                    existing = self._claim_of.first(conn, sop=claim.sop_instance_uid)
                    if existing is not None or attempt == _CLAIM_ATTEMPTS - 1:
                        return self._claim(conn, claim, check_only=True)
            except _SAError as exc:
                raise Unavailable(f"index database: {exc}") from exc
        raise Unavailable("claim raced with concurrent writers; retry")

    def _check(self, conn: Connection, claim: InstanceClaim) -> tuple[ClaimOutcome, bool]:
        """(NEW or DUPLICATE, whether the study is new); ConflictError on a conflict."""
        return self._decide(self._claim_context.first(
            conn, sop=claim.sop_instance_uid, series=claim.series_instance_uid,
            study=claim.study_instance_uid), claim,
            lambda study: corrections.current_identity(conn, study))

    def _decide(self, known: Any, claim: InstanceClaim,
                current_identity: Callable[[str], tuple[str, str] | None] | None = None,
                ) -> tuple[ClaimOutcome, bool]:
        """``_check`` given the claim context row (a Row or the driver's tuple), and how
        to read a study's identity after corrections (default: a connection of its own)."""
        blob_key, dataset_sha256, series_study, owner_patient_id, owner_issuer = known
        if blob_key is not None:
            # The same bytes; or, where both claims carry one (claims recorded by
            # earlier versions did), the same data set hash.
            if blob_key == claim.blob_key or (
                    dataset_sha256 and dataset_sha256 == claim.dataset_sha256):
                return ClaimOutcome.DUPLICATE, False
            raise ConflictError(
                ConflictKind.SOP_INSTANCE,
                "SOP Instance UID already stored with different content",
            )
        if series_study is not None and series_study != claim.study_instance_uid:
            # Filed under the series' study it would join another study (and maybe
            # another patient): UIDs are unique, so one of the two is wrong.
            raise ConflictError(
                ConflictKind.SERIES, "Series Instance UID belongs to another study")
        new_study = owner_patient_id is None
        if not new_study and (owner_patient_id, owner_issuer) != (
            claim.patient_id, claim.issuer_of_patient_id,
        ) and (current_identity or self._current_identity)(claim.study_instance_uid) != (
            claim.patient_id, claim.issuer_of_patient_id,
        ):
            # Received under one identity, corrected or merged to another: either is
            # the study's own; anything else is another patient.
            raise ConflictError(
                ConflictKind.PATIENT, "Study Instance UID belongs to another Patient ID"
            )
        return ClaimOutcome.NEW, new_study

    def _current_identity(self, study_instance_uid: str) -> tuple[str, str] | None:
        # Corrections commit under the same write lock as claims: a connection of
        # its own reads what the claim's transaction would.
        with self.engine.connect() as conn:
            return corrections.current_identity(conn, study_instance_uid)

    def check_claim(self, claim: InstanceClaim) -> ClaimOutcome:
        try:
            if self.dialect == "sqlite":  # on the driver, as claims are (_claim_group)
                with self._store_connections.cursor() as cursor:
                    known = self._claim_context.first_raw(
                        cursor, sop=claim.sop_instance_uid,
                        series=claim.series_instance_uid, study=claim.study_instance_uid)
                outcome = self._decide(known, claim)[0]
                if outcome is ClaimOutcome.DUPLICATE:
                    # The claim seen may be another sender's, committed but not yet
                    # synced (make_durable): this "already stored" is acknowledged
                    # too, so it waits for the same sync.
                    self._store_connections.wal.make_durable()
                return outcome
            with self.engine.connect() as conn:
                return self._check(conn, claim)[0]
        except (_SAError, _DriverError, OSError) as exc:  # OSError: make_durable
            raise Unavailable(f"index database: {exc}") from exc

    def _claim(self, conn: Connection, claim: InstanceClaim, check_only: bool = False
               ) -> ClaimOutcome:
        outcome, new_study = self._check(conn, claim)
        if outcome is ClaimOutcome.DUPLICATE:
            return outcome
        if check_only:
            raise Unavailable("claim raced with a concurrent writer; retry")
        if new_study:
            conn.execute(_INSERT_STUDY_PATIENT, {
                "study_instance_uid": claim.study_instance_uid,
                "patient_id": claim.patient_id,
                "issuer_of_patient_id": claim.issuer_of_patient_id})
        conn.execute(_INSERT_CLAIM, {**claim.model_dump(), "claimed_at": _now()})
        return ClaimOutcome.NEW

    def find_claim(self, sop_instance_uid: str) -> InstanceClaim | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(claims).where(claims.c.sop_instance_uid == sop_instance_uid)
            ).first()
        if row is None:
            return None
        data = dict(row._mapping)
        data.pop("claimed_at", None)
        return InstanceClaim.model_validate(data)

    def record_audit(self, action: str, outcome: str, *, actor: str = "", subject: str = "",
                     detail: str = "") -> str:
        """Append to the audit trail; each record hashes its predecessor (tamper-evident)."""
        with self.write_transaction() as conn:
            return self._append_audit(conn, action, outcome, actor=actor, subject=subject,
                                      detail=detail)

    def _append_audit(self, conn: Connection, action: str, outcome: str, *, actor: str = "",
                      subject: str = "", detail: str = "") -> str:
        """``record_audit`` inside the caller's write transaction."""
        at = _now()
        if self.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(74212)"))
        prev = conn.execute(select(audit.c.hash).order_by(audit.c.id.desc()).limit(1)
                            ).scalar() or ""
        digest = chain_hash(prev, at, action, outcome, actor, subject, detail)
        conn.execute(audit.insert().values(at=at, action=action, outcome=outcome,
                                           actor=actor, subject=subject, detail=detail,
                                           prev_hash=prev, hash=digest))
        return digest

    def verify_audit(self) -> bool:
        """True when every audit record's hash still matches its content and chain."""
        prev = ""
        with self.engine.connect() as conn:
            for row in conn.execute(select(audit).order_by(audit.c.id)):
                at = row.at if row.at.tzinfo else row.at.replace(tzinfo=UTC)
                if row.prev_hash != prev or chain_hash(
                        prev, at, row.action, row.outcome, row.actor, row.subject,
                        row.detail) != row.hash:
                    return False
                prev = row.hash
        return True

    def audit_records(self, action: str | None = None) -> list[dict[str, Any]]:
        stmt = select(audit).order_by(audit.c.id)
        if action:
            stmt = stmt.where(audit.c.action == action)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def patient_of_study(self, study_instance_uid: str) -> tuple[str, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(study_patients.c.patient_id, study_patients.c.issuer_of_patient_id)
                .where(study_patients.c.study_instance_uid == study_instance_uid)
            ).first()
        return (row.patient_id, row.issuer_of_patient_id) if row else None

    def claims(self) -> Iterator[InstanceClaim]:
        with self.engine.connect() as conn:
            for row in conn.execute(select(claims)):
                data = dict(row._mapping)
                data.pop("claimed_at", None)
                yield InstanceClaim.model_validate(data)

    # ------------------------------------------------------------ outbox
    def relay_outbox(self, publish: Callable[[list[tuple[str, bytes]]], None],
                     limit: int = 200) -> int:
        """Hand up to ``limit`` pending events to ``publish``; delete them once it returns.

        PostgreSQL: rows are locked (SKIP LOCKED) for the duration, so several
        relays share the outbox without publishing an event twice. SQLite: one
        relay per data directory; rows are read, published, then deleted (the
        local bus writes to this same database while publishing).
        """
        try:
            if self.dialect == "postgresql":
                with self.engine.begin() as conn:
                    rows = conn.execute(
                        select(outbox.c.id, outbox.c.routing_key, outbox.c.payload)
                        .order_by(outbox.c.id).limit(limit).with_for_update(skip_locked=True)
                    ).all()
                    if rows:
                        publish([(r.routing_key, bytes(r.payload)) for r in rows])
                        conn.execute(outbox.delete().where(outbox.c.id.in_([r.id for r in rows])))
                    return len(rows)
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(outbox.c.id, outbox.c.routing_key, outbox.c.payload)
                    .order_by(outbox.c.id).limit(limit)
                ).all()
            if rows:
                publish([(r.routing_key, bytes(r.payload)) for r in rows])
                with self.write_transaction() as conn:
                    conn.execute(outbox.delete().where(outbox.c.id.in_([r.id for r in rows])))
            return len(rows)
        except _SAError as exc:
            raise Unavailable(f"index database: {exc}") from exc

    # ------------------------------------------------------------ commitment
    def owe_commitment(self, pending: PendingCommitment, *, hold_seconds: float) -> None:
        now = _now()
        with self.write_transaction() as conn:
            conn.execute(commitment_requests.insert().values(
                request_id=pending.request_id, requester=pending.requester,
                transaction_uid=pending.transaction_uid, items=json.dumps(pending.items),
                attempts=pending.attempts, due_at=now,
                held_until=now + timedelta(seconds=hold_seconds), created_at=now))

    def take_due_commitments(self, *, hold_seconds: float, all_pending: bool = False,
                             limit: int = 20) -> list[PendingCommitment]:
        now = _now()
        free = commitment_requests.c.held_until <= now
        wanted = free if all_pending else and_(free, commitment_requests.c.due_at <= now)
        with self.engine.connect() as conn:  # a read first: this is polled
            if conn.execute(select(commitment_requests.c.request_id).where(wanted).limit(1)
                            ).first() is None:
                return []
        with self.write_transaction() as conn:
            stmt = (select(commitment_requests).where(wanted)
                    .order_by(commitment_requests.c.due_at).limit(limit))
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            rows = conn.execute(stmt).all()
            if rows:
                conn.execute(update(commitment_requests)
                             .where(commitment_requests.c.request_id.in_(
                                 [row.request_id for row in rows]))
                             .values(held_until=now + timedelta(seconds=hold_seconds)))
        return [PendingCommitment(
            request_id=row.request_id, requester=row.requester,
            transaction_uid=row.transaction_uid,
            items=[(str(c), str(i)) for c, i in json.loads(row.items)],
            attempts=row.attempts) for row in rows]

    def retry_commitment(self, request_id: str, *, attempts: int, after_seconds: float
                         ) -> None:
        now = _now()
        with self.write_transaction() as conn:
            conn.execute(update(commitment_requests)
                         .where(commitment_requests.c.request_id == request_id)
                         .values(attempts=attempts, held_until=now,
                                 due_at=now + timedelta(seconds=after_seconds)))

    def settle_commitment(self, request_id: str) -> None:
        with self.write_transaction() as conn:
            conn.execute(delete(commitment_requests)
                         .where(commitment_requests.c.request_id == request_id))

    def outbox_depth(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())

    # ------------------------------------------------------------ indexer
    def upsert_instance(self, record: IndexRecord, event: Event | None = None) -> bool:
        return self.upsert_instances([(record, event)])[0]

    def upsert_instances(self, items: Sequence[tuple[IndexRecord, Event | None]]
                         ) -> list[bool]:
        """Index a batch in one transaction: one commit (one fsync) for all of it,
        and each patient, study and series looked up once per batch."""
        if not items:
            return []
        try:
            with self.write_transaction() as conn:
                return _Upsert(self, conn).run(items)
        except (DataError, OverflowError) as exc:
            # A value out of a column's range or type: this batch fails every time.
            raise RecordRefused(f"index database refused a value: {exc}") from exc
        except _SAError as exc:
            raise Unavailable(f"index database: {exc}") from exc

    def extended_progress(self) -> dict[str, BackfillState]:
        with self.engine.connect() as conn:
            return extra.progress(conn)

    def extended_forget(self, keep: set[str]) -> list[str]:
        with self.write_transaction() as conn:
            return extra.forget(conn, keep)

    def extended_scan(self, after_pk: int, limit: int) -> list[StoredHeader]:
        with self.engine.connect() as conn:
            return extra.scan(conn, after_pk, limit)

    def extended_write(self, values: Sequence[tuple[int, ExtraValue]],
                       last_pk: dict[str, int], completed: set[str]) -> None:
        try:
            with self.write_transaction() as conn:
                extra.write_values(conn, values)
                extra.record_progress(conn, last_pk, completed)
        except _SAError as exc:
            raise Unavailable(f"index database: {exc}") from exc

    # ------------------------------------------------------------ readers
    def instances(
        self,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        patient_id: str | None = None,
    ) -> list[StoredInstance]:
        stmt = (
            select(
                studies.c.study_instance_uid, series.c.series_instance_uid,
                instances.c.sop_instance_uid, instances.c.sop_class_uid,
                instances.c.transfer_syntax_uid, instances.c.blob_key, instances.c.size,
                instances.c.stored_at,
            )
            .select_from(instances.join(series).join(studies).join(patients))
            .order_by(series.c.series_number, series.c.pk, instances.c.instance_number,
                      instances.c.pk)
        )
        if study_instance_uid:
            stmt = stmt.where(studies.c.study_instance_uid == study_instance_uid)
        if series_instance_uid:
            stmt = stmt.where(series.c.series_instance_uid == series_instance_uid)
        if sop_instance_uid:
            stmt = stmt.where(instances.c.sop_instance_uid == sop_instance_uid)
        if patient_id is not None:
            stmt = stmt.where(or_(patients.c.patient_id == patient_id,
                                  corrections.merged_into_condition(
                                      [corrections.PRIOR_COLUMNS["PatientID"] == patient_id])))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            StoredInstance(
                ref=InstanceRef(
                    study_instance_uid=r.study_instance_uid,
                    series_instance_uid=r.series_instance_uid,
                    sop_instance_uid=r.sop_instance_uid,
                ),
                sop_class_uid=r.sop_class_uid,
                transfer_syntax_uid=r.transfer_syntax_uid,
                blob_key=BlobKey(r.blob_key),
                size=r.size,
                stored_at=r.stored_at,
            )
            for r in rows
        ]

    def metadata(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        version: int | None = None,
    ) -> list[str]:
        stmt = (
            select(instances.c.metadata)
            .select_from(instances.join(series).join(studies))
            .where(studies.c.study_instance_uid == study_instance_uid)
            .order_by(series.c.series_number, series.c.pk, instances.c.instance_number,
                      instances.c.pk)
        )
        if series_instance_uid:
            stmt = stmt.where(series.c.series_instance_uid == series_instance_uid)
        if sop_instance_uid:
            stmt = stmt.where(instances.c.sop_instance_uid == sop_instance_uid)
        with self.engine.connect() as conn:
            docs = [r[0] for r in conn.execute(stmt)]
            _, overlay = corrections.overlay_of(conn, study_instance_uid, version)
        return corrections.overlay_docs(docs, overlay)

    # ------------------------------------------------------------ corrections
    def correct_study(self, study_instance_uid: str, changes: Mapping[str, str], *,
                      reason: str, actor: str) -> str:
        return corrections.Corrections(self).correct_study(
            study_instance_uid, changes, reason=reason, actor=actor)

    def merge_patients(self, prior_patient_id: str, prior_issuer_of_patient_id: str,
                       patient_id: str, issuer_of_patient_id: str, *, actor: str) -> str:
        return corrections.Corrections(self).merge_patients(
            prior_patient_id, prior_issuer_of_patient_id, patient_id, issuer_of_patient_id,
            actor=actor)

    def unmerge_patients(self, merge_ref: str, *, actor: str) -> None:
        corrections.Corrections(self).unmerge_patients(merge_ref, actor=actor)

    def journal_keys(self) -> set[str]:
        with self.engine.connect() as conn:
            return corrections.journal_keys(conn)

    def replay_journal(self, entry: JournalEntry) -> str:
        return corrections.Corrections(self, replay=entry).replay_entry()

    def study_versions(self, study_instance_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return corrections.versions(conn, study_instance_uid)

    def metadata_revision(self, study_instance_uid: str,
                          series_instance_uid: str | None = None,
                          sop_instance_uid: str | None = None) -> str | None:
        """The study's revision (None: no such study, series or instance): one
        indexed look-up, whatever the size of the study."""
        prepared = self._revision_of[(series_instance_uid is not None,
                                      sop_instance_uid is not None)]
        with self.engine.connect() as conn:
            row = prepared.first(conn, **{name: value for name, value in (
                ("study", study_instance_uid), ("series", series_instance_uid),
                ("sop", sop_instance_uid)) if value is not None})
        return None if row is None else str(row[0])

    def metadata_version(self, study_instance_uid: str) -> int:
        with self.engine.connect() as conn:
            return corrections.overlay_of(conn, study_instance_uid)[0]

    def search(self, query: Query) -> list[dict[str, Any]]:
        return _Search(self, query).run()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            out = {
                name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for name, t in (("patients", patients), ("studies", studies),
                                ("series", series), ("instances", instances),
                                ("claims", claims), ("outbox", outbox))
            }
        out["unindexed"] = max(0, out["claims"] - out["instances"])
        return out

    def check(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except _SAError as exc:
            raise Unavailable(f"index database: {exc}") from exc

    def close(self) -> None:
        self._store_connections.close()
        self.engine.dispose()
        self._sqlite_write.close()


class _Upsert:
    """One batch of ``upsert_instances`` inside its write transaction."""

    def __init__(self, index: SqlIndex, conn: Connection) -> None:
        self.index = index
        self.conn = conn
        self.patient_pks: dict[tuple[str, str], int] = {}
        self.study_pks: dict[str, int] = {}
        self.series_pks: dict[str, int] = {}

    def run(self, items: Sequence[tuple[IndexRecord, Event | None]]) -> list[bool]:
        uids = [record.instance["SOPInstanceUID"] for record, _ in items]
        present = set(self.conn.execute(
            select(instances.c.sop_instance_uid).where(instances.c.sop_instance_uid.in_(uids))
        ).scalars())
        rows: list[dict[str, Any]] = []
        events: dict[str, Event | None] = {}
        now = _now()
        for record, indexed in items:
            sop_uid = record.instance["SOPInstanceUID"]
            if sop_uid in present or sop_uid in events:
                continue  # already indexed, or twice in this batch (redelivery)
            events[sop_uid] = indexed
            rows.append(dict(sop_instance_uid=sop_uid, series_pk=self._series_pk(record),
                             transfer_syntax_uid=record.transfer_syntax_uid,
                             blob_key=record.blob_key, size=record.size,
                             metadata=record.metadata_json, stored_at=now,
                             **_columns(record.instance, Level.IMAGE)))
        added: dict[str, int] = {}  # SOP Instance UID -> instance pk
        owners = {uid: (record.patient.get("PatientID") or "", record.study["StudyInstanceUID"])
                  for (record, _), uid in zip(items, uids, strict=True)}
        for group in _same_columns(rows):
            # RETURNING tells which rows went in: a concurrent indexer (PostgreSQL)
            # may have added some in the meantime.
            for row in self.conn.execute(
                    self.index._insert(instances)
                    .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                    .returning(instances.c.sop_instance_uid, instances.c.pk), group):
                added[row.sop_instance_uid] = int(row.pk)
        # Extended query attribute values, in the instances' transaction.
        extra.write_values(self.conn, [
            owned for record, _ in items
            if (pk := added.get(record.instance["SOPInstanceUID"])) is not None
            for owned in extra.owned_values(record.extended, {
                Level.PATIENT: self._patient_pk(record), Level.STUDY: self._study_pk(record),
                Level.SERIES: self._series_pk(record), Level.IMAGE: pk})])
        new_records = [record for record, _ in items
                       if record.instance["SOPInstanceUID"] in added]
        sequences.write_items(self.conn, [
            (self._series_pk(record), record.sequence_items
             if record.sequence_items is not None
             else sequence_items(json.loads(record.metadata_json)))
            for record in new_records])
        for patient_id, study_uid in dict.fromkeys(owners[uid] for uid in added):
            corrections.after_upsert(self.index, self.conn, patient_id, study_uid)
        if touched := sorted({self._study_pk(record) for record in new_records}):
            corrections.touch_studies(self.conn, studies.c.pk.in_(touched))
            # After the touch, which locks these studies' rows in one order (PostgreSQL):
            # updating some of them before it could deadlock two indexers.
            self._fill_timezone_offsets(new_records)
        outgoing = [{"routing_key": e.routing_key, "payload": encode_event(e),
                     "created_at": now, "attempts": 0}
                    for uid, e in events.items() if e is not None and uid in added]
        if outgoing:
            self.conn.execute(outbox.insert(), outgoing)
        result, seen = [], set()
        for uid in uids:  # an instance twice in one batch was added once
            result.append(uid in added and uid not in seen)
            seen.add(uid)
        return result

    def _fill_timezone_offsets(self, records: list[IndexRecord]) -> None:
        """A study made by an instance without an offset takes the first one that
        comes (as revision 0009 does for studies indexed before it)."""
        offsets = {self._study_pk(r): offset for r in records
                   if (offset := r.study.get("TimezoneOffsetFromUTC"))}
        for pk in sorted(offsets):
            self.conn.execute(studies.update().where(
                studies.c.pk == pk, studies.c.timezone_offset_from_utc == ""
            ).values(timezone_offset_from_utc=offsets[pk]))

    def _patient_pk(self, record: IndexRecord) -> int:
        key = (record.patient.get("PatientID") or "",
               record.patient.get("IssuerOfPatientID") or "")
        if key not in self.patient_pks:
            self.patient_pks[key] = self._get_or_insert(
                patients, and_(patients.c.patient_id == key[0],
                               patients.c.issuer_of_patient_id == key[1]),
                {"patient_id": key[0], "issuer_of_patient_id": key[1],
                 **_columns(record.patient, Level.PATIENT)})
        return self.patient_pks[key]

    def _study_pk(self, record: IndexRecord) -> int:
        uid = record.study["StudyInstanceUID"]
        if uid not in self.study_pks:
            self.study_pks[uid] = self._get_or_insert(
                studies, studies.c.study_instance_uid == uid,
                {"study_instance_uid": uid, "patient_pk": self._patient_pk(record),
                 **_columns(record.study, Level.STUDY)})
        return self.study_pks[uid]

    def _series_pk(self, record: IndexRecord) -> int:
        uid = record.series["SeriesInstanceUID"]
        if uid not in self.series_pks:
            self.series_pks[uid] = self._get_or_insert(
                series, series.c.series_instance_uid == uid,
                {"series_instance_uid": uid, "study_pk": self._study_pk(record),
                 **_columns(record.series, Level.SERIES)})
        return self.series_pks[uid]

    def _get_or_insert(self, table: Any, where: ColumnElement[bool],
                       values: dict[str, Any]) -> int:
        row = self.conn.execute(select(table.c.pk).where(where)).first()
        if row is not None:
            return int(row.pk)
        self.conn.execute(self.index._insert(table).values(**values).on_conflict_do_nothing())
        return int(self.conn.execute(select(table.c.pk).where(where)).scalar_one())


def _same_columns(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Rows grouped by their set of columns (one multi-row INSERT each)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    yield from groups.values()


@dataclass
class _PendingClaim:
    """A claim waiting for the next group commit (SQLite), its rows made before:
    the commit holds the one write lock of every receiver process."""

    claim: InstanceClaim
    event: InstanceStored
    outcome: ClaimOutcome | None = None
    error: Exception | None = None
    done: bool = False
    claim_row: dict[str, Any] = field(init=False)
    payload: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.claim_row = self.claim.model_dump()
        self.payload = encode_event(self.event)


class _Prepared:
    """A select compiled once for the engine's dialect and run through the driver.

    The store path runs these lookups for every instance received; SQLAlchemy's
    per-call work (cache key, compiled-cache lookup) costs more than the lookup.
    For selects of plain values only: the driver's types are returned as they are.
    """

    def __init__(self, stmt: Select[Any], engine: Engine) -> None:
        self._compiled = stmt.compile(dialect=engine.dialect)
        self._sql = str(self._compiled)

    def first(self, conn: Connection, **values: Any) -> Any:
        return conn.exec_driver_sql(self._sql, self._args(values)).first()

    def first_raw(self, cursor: Any, **values: Any) -> Any:
        """The first row as the driver's tuple, on a DBAPI cursor."""
        return cursor.execute(self._sql, self._args(values)).fetchone()

    def _args(self, values: dict[str, Any]) -> Any:
        params = self._compiled.construct_params(values)
        return (tuple(params[name] for name in self._compiled.positiontup or ())
                if self._compiled.positional else params)


class _RawInsert:
    """An insert of whole rows compiled once and run on the driver's cursor, each value
    converted by its column type as SQLAlchemy would (SQLite's store path: a claim
    costs 0.8 ms of CPU through ``Connection.execute``, 0.15 ms this way)."""

    def __init__(self, table: Any, engine: Engine, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.sql = str(table.insert().values(
            {name: bindparam(name) for name in self.columns}).compile(dialect=engine.dialect))
        self._convert = [table.c[name].type.bind_processor(engine.dialect)
                         for name in self.columns]

    def run(self, cursor: Any, values: Mapping[str, Any]) -> None:
        cursor.execute(self.sql, tuple(
            value if convert is None or value is None else convert(value)
            for convert, value in zip(self._convert,
                                      (values[name] for name in self.columns), strict=True)))


class _DriverConnections:
    """The SQLite store path's own connections, taken from the engine (its settings
    applied) and kept aside: the pool's check-out and reset cost as much as a claim.
    A connection that failed is dropped, not reused.

    Their commits are made durable by ``make_durable``, after the write lock is
    released, not inside COMMIT (``synchronous=NORMAL`` on these connections):
    with synchronous=FULL each receiver process held the one write lock of all of
    them through its fdatasync, and the lock was busy more than half the time at
    four associations. WAL frames are appended in commit order, so one fdatasync
    of the WAL after COMMIT makes that commit, and every one before it, durable:
    exactly the sync FULL adds to each commit (sqlite.org/pragma.html#pragma_synchronous),
    and concurrent claims share it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._free: list[Any] = []
        self.wal = WalSync(engine)

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        connection: Any
        try:
            connection = self._free.pop()  # atomic: no lock needed
        except IndexError:
            fairy = self._engine.raw_connection()
            connection = fairy.driver_connection
            fairy.detach()  # ours now; the pool forgets it
            if self.wal.database:
                connection.execute("PRAGMA synchronous=NORMAL")  # see make_durable
        cursor = connection.cursor()
        try:
            yield cursor
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        cursor.close()
        self._free.append(connection)

    def close(self) -> None:
        while self._free:
            with contextlib.suppress(Exception):
                self._free.pop().close()
        self.wal.close()


class SqliteWriteLock(FileLock):
    """One SQLite writer at a time, across threads and processes.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... ms between attempts, which
    under several writing processes (``VNA_INGEST_WORKERS``) costs more than the
    writes. A lock file taken with flock() hands over at once instead.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database or ""
        super().__init__(database + ".lock" if engine.dialect.name == "sqlite" and database
                         and database != ":memory:" else None)


class WriteTransaction:
    """``with WriteTransaction(engine, lock, wal) as conn``: one write transaction,
    serialised by ``lock`` (SQLite's one writer; None for PostgreSQL).

    On an SQLite file it commits with ``synchronous=NORMAL`` under the lock and is
    made durable by ``wal`` once the lock is released, as the store path's claims
    are: the exit returns only when the transaction is durable, but the next
    writer does not wait for this one's sync. The index (relaying, indexing) and
    the worklist (binding, MPPS, HL7) write through here; with the sync inside
    the lock every receiver's claim queued behind theirs."""

    def __init__(self, engine: Engine, lock: AbstractContextManager[Any] | None,
                 wal: WalSync, *, name: str = "index database") -> None:
        self.engine = engine
        self.lock = lock
        self.wal = wal
        self.name = name
        self._ctx: Any = None
        self._conn: Any = None

    def __enter__(self) -> Connection:
        if self.lock is not None:
            self.lock.__enter__()
        try:
            self._conn = self.engine.connect()
            self._conn.info["write"] = True  # BEGIN IMMEDIATE on SQLite (make_engine)
            if self.wal.database:
                self._driver().execute("PRAGMA synchronous=NORMAL")
            self._ctx = self._conn.begin()
            self._ctx.__enter__()
            conn: Connection = self._conn
            return conn
        except BaseException:
            self._close()
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        ticket = None
        try:
            try:
                self._ctx.__exit__(*exc)
                if exc[0] is None:
                    ticket = self.wal.ticket()  # committed: its WAL frames are written
            finally:
                self._close()
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)
        if ticket is not None:
            try:
                self.wal.make_durable(ticket)
            except OSError as error:
                raise Unavailable(f"{self.name}: {error}") from error

    def _driver(self) -> Any:
        return self._conn.connection.driver_connection

    def _close(self) -> None:
        """Back to the pool as the pool hands connections out (synchronous=FULL);
        a connection whose setting cannot be restored is discarded instead."""
        if self._conn is None:
            return
        self._conn.info.pop("write", None)
        if self.wal.database:
            try:
                self._driver().execute("PRAGMA synchronous=FULL")
            except (_DriverError, _SAError):
                self._conn.invalidate()
        self._conn.close()


def _columns(values: dict[str, Any], level: Level) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword, value in values.items():
        base = keyword.split("_")[0]
        attr = ATTRIBUTES.get(base)
        if attr is None or attr.level != level or attr.computed:
            continue
        if base in ("PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID"):
            continue
        out[column_name(keyword)] = value if value is not None or attr.vr in (
            "IS", "US", "UL", "SL", "SS") else ""
    return out


# ------------------------------------------------------------------ query translation
def _count_of(parent: Level, child: Level) -> Any:
    """Correlated count of ``child`` rows under the ``parent`` row of the outer query."""
    chain = [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE]
    start, end = chain.index(parent), chain.index(child)
    joined: Any = _TABLE_OF_LEVEL[child]
    for level in reversed(chain[start + 1 : end]):
        joined = joined.join(_TABLE_OF_LEVEL[level])
    first_below = _TABLE_OF_LEVEL[chain[start + 1]]
    fk = {studies: studies.c.patient_pk, series: series.c.study_pk,
          instances: instances.c.series_pk}[first_below]
    parent_pk = _TABLE_OF_LEVEL[parent].c.pk
    return (select(func.count()).select_from(joined).where(fk == parent_pk)
            .correlate(_TABLE_OF_LEVEL[parent]).scalar_subquery())


# Computed attributes (PS3.4 C.3.4) as correlated subqueries of the search's own
# statement: one statement per search, evaluated only for the rows returned.
_CHILD_COUNTS = {
    "NumberOfPatientRelatedStudies": (Level.PATIENT, _count_of(Level.PATIENT, Level.STUDY)),
    "NumberOfPatientRelatedSeries": (Level.PATIENT, _count_of(Level.PATIENT, Level.SERIES)),
    "NumberOfPatientRelatedInstances": (Level.PATIENT,
                                        _count_of(Level.PATIENT, Level.IMAGE)),
    "NumberOfStudyRelatedSeries": (Level.STUDY, _count_of(Level.STUDY, Level.SERIES)),
    "NumberOfStudyRelatedInstances": (Level.STUDY, _count_of(Level.STUDY, Level.IMAGE)),
    "NumberOfSeriesRelatedInstances": (Level.SERIES, _count_of(Level.SERIES, Level.IMAGE)),
}
_IN_STUDY_SEPARATOR = ","  # neither CS (modalities) nor UI values contain it


def _distinct_in_study(dialect: str, column: Any, joined: Any, *where: Any) -> Any:
    """The distinct values of ``column`` in the outer query's study, joined by a comma."""
    agg = (func.string_agg(distinct(column), literal_column(f"'{_IN_STUDY_SEPARATOR}'"))
           if dialect == "postgresql" else func.group_concat(distinct(column)))
    return (select(agg).select_from(joined).where(series.c.study_pk == studies.c.pk, *where)
            .correlate(studies).scalar_subquery())


def _in_study_columns(dialect: str) -> dict[str, Any]:
    return {
        "ModalitiesInStudy": _distinct_in_study(dialect, series.c.modality, series,
                                                series.c.modality != ""),
        "SOPClassesInStudy": _distinct_in_study(dialect, instances.c.sop_class_uid,
                                                instances.join(series)),
    }


_IN_STUDY_SEPARATOR_KEYS = ("ModalitiesInStudy", "SOPClassesInStudy")
_IN_STUDY = {name: _in_study_columns(name) for name in ("sqlite", "postgresql")}
_FROM_OF_LEVEL = {
    Level.PATIENT: patients,
    Level.STUDY: studies.join(patients),
    Level.SERIES: series.join(studies).join(patients),
    Level.IMAGE: instances.join(series).join(studies).join(patients),
}


_SEARCH_STATEMENTS = 512  # forms of query kept; more: start again


class _Search:
    def __init__(self, index: SqlIndex, query: Query) -> None:
        self.index = index
        self.query = query
        self.level = query.level
        self.base = _TABLE_OF_LEVEL[query.level]

    def _column(self, keyword: str, norm: bool = False) -> Any:
        if keyword in _UID_COLUMN:
            return _UID_COLUMN[keyword]
        attr = ATTRIBUTES[keyword]
        table = _TABLE_OF_LEVEL[attr.level]
        return table.c[column_name(keyword + ("_norm" if norm else ""))]

    def _condition(self, m: Match, column: Any = None, params: list[Any] | None = None
                   ) -> ColumnElement[bool]:
        if m.extended is not None:
            return extra.condition(m, _TABLE_OF_LEVEL[m.extended.level].c.pk)
        if m.keyword == "ModalitiesInStudy":
            return exists().where(and_(series.c.study_pk == studies.c.pk,
                                       text_condition(m, series.c.modality, params)))
        attr = ATTRIBUTES[m.keyword]
        folded = attr.vr in ("PN", "TM")
        col: ColumnElement[str] = (self._column(m.keyword, norm=folded) if column is None
                                   else column)
        return text_condition(m, col, params)

    def run(self) -> list[dict[str, Any]]:
        q = self.query
        params: dict[str, Any] = {}
        if any(m.extended is not None for m in q.matches):
            stmt = self._statement(bound=False)
        else:
            # Built once per form of query, run with this request's values: building
            # a statement and its cache key cost more than running it.
            form = (self.level, q.return_keys, q.limit, q.offset,
                    tuple((m.keyword, text_form(m)) for m in q.matches))
            params = {f"m{i}_{j}": value for i, m in enumerate(q.matches)
                      for j, value in enumerate(text_params(m))}
            statements = self.index._search_statements
            found = statements.get(form)
            if found is None:
                found = self._statement(bound=True)
                if len(statements) >= _SEARCH_STATEMENTS:
                    statements.clear()
                statements[form] = found
            stmt = found
        computed = [k for k in dict.fromkeys(q.return_keys) if _computed(k)]
        with self.index.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt, params)]
            if rows and (q.extra_return_keys or q.extended_return):
                self._representative_metadata(conn, rows)
            for keyword in dict.fromkeys(k for k in q.return_keys if k in SEQUENCES):
                items = sequences.items_of_series(
                    conn, keyword, [r["SeriesInstanceUID"] for r in rows])
                for row in rows:
                    row[keyword] = items.get(row["SeriesInstanceUID"], [])
        for keyword in set(computed) & set(_IN_STUDY_SEPARATOR_KEYS):
            for row in rows:
                joined = row.get(keyword)
                row[keyword] = sorted(joined.split(_IN_STUDY_SEPARATOR)) if joined else []
        return rows

    def _statement(self, *, bound: bool) -> Select[Any]:
        """The search's SELECT; ``bound``: matching values as bound parameters named
        ``m<match>_<value>`` (``text_params``), else as literals."""
        q = self.query
        wanted: list[str] = []
        for keyword in q.return_keys:
            attr = ATTRIBUTES.get(keyword)
            if attr is None or attr.computed:
                continue  # a sequence's items are read after the search
            if _level_index(attr.level) <= _level_index(self.level):
                wanted.append(keyword)
        for keyword in _hierarchy_keys(self.level):
            if keyword not in wanted:
                wanted.append(keyword)
        cols = [self.base.c.pk.label("_pk")]
        cols += [self._column(k).label(k) for k in wanted]
        computed = [k for k in dict.fromkeys(q.return_keys) if _computed(k)]
        cols += self._computed_columns(computed)
        stmt: Select[Any] = select(*cols).select_from(_FROM_OF_LEVEL[self.level])

        def binds(i: int, m: Match) -> list[Any] | None:
            if not bound:
                return None
            return [bindparam(f"m{i}_{j}") for j in range(len(text_params(m)))]

        identity: list[tuple[int, Match]] = []
        in_items: dict[str, list[tuple[Match, list[Any] | None]]] = {}
        for i, m in enumerate(q.matches):
            if ATTRIBUTES.get(m.keyword) and _level_index(ATTRIBUTES[m.keyword].level) > \
                    _level_index(self.level):
                continue
            if (split := sequence_key(m.keyword)) is not None:
                in_items.setdefault(split[0], []).append((m, binds(i, m)))
                continue
            if m.keyword in corrections.PRIOR_COLUMNS:
                identity.append((i, m))
                continue
            stmt = stmt.where(self._condition(m, params=binds(i, m)))
        if identity:
            # A merged patient's former identity finds the survivor's studies.
            stmt = stmt.where(patients.c.pk.in_(corrections.identity_patients(
                lambda table: [self._condition(m, table.c[column_name(m.keyword)],
                                               binds(i, m)) for i, m in identity],
                [self._condition(m, corrections.PRIOR_COLUMNS[m.keyword], binds(i, m))
                 for i, m in identity])))
        for item_matches in in_items.values():
            stmt = stmt.where(sequences.condition(item_matches))
        if self.level is Level.PATIENT:
            # Left without studies by a correction or merge: not a patient of the archive.
            stmt = stmt.where(exists().where(studies.c.patient_pk == patients.c.pk))
        stmt = stmt.order_by(self.base.c.pk)
        if q.limit is not None:
            stmt = stmt.limit(q.limit)
        if q.offset:
            stmt = stmt.offset(q.offset)
        return stmt

    def _computed_columns(self, computed: list[str]) -> list[Any]:
        """The computed return keys of this level, as columns of the search's statement."""
        cols = []
        for keyword in computed:
            if keyword in _CHILD_COUNTS:
                parent, count = _CHILD_COUNTS[keyword]
                if parent is self.level:
                    cols.append(count.label(keyword))
            elif self.level is Level.STUDY and keyword in _IN_STUDY_SEPARATOR_KEYS:
                cols.append(_IN_STUDY[self.index.dialect][keyword].label(keyword))
        return cols

    def _representative_metadata(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Attach one instance's DICOM JSON per row, for return keys not kept as columns."""
        pks = [r["_pk"] for r in rows]
        stmt: Select[Any]
        if self.level is Level.IMAGE:
            stmt = select(instances.c.pk, instances.c.metadata, studies.c.study_instance_uid
                          ).select_from(instances.join(series).join(studies)
                                        ).where(instances.c.pk.in_(pks))
        else:
            owner = {Level.SERIES: series.c.pk, Level.STUDY: studies.c.pk,
                     Level.PATIENT: patients.c.pk}[self.level]
            first = (
                select(owner.label("owner"), func.min(instances.c.pk).label("ipk"))
                .select_from(instances.join(series).join(studies).join(patients))
                .where(owner.in_(pks)).group_by(owner).subquery()
            )
            stmt = select(first.c.owner, instances.c.metadata, studies.c.study_instance_uid
                          ).select_from(first.join(instances, instances.c.pk == first.c.ipk)
                                        .join(series).join(studies))
        found: dict[int, tuple[str, str]] = {
            int(r[0]): (str(r[1]), str(r[2])) for r in conn.execute(stmt)}
        corrected = corrections.overlays(conn, sorted({uid for _, uid in found.values()}))
        for row in rows:
            meta, uid = found.get(row["_pk"], ("", ""))
            doc = json.loads(meta) if meta else {}
            row["_metadata"] = apply_to_json(doc, corrected[uid][1]) if uid in corrected \
                else doc


def _computed(keyword: str) -> bool:
    attr = ATTRIBUTES.get(keyword)
    return attr is not None and attr.computed


def _level_index(level: Level) -> int:
    return [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE].index(level)


def _hierarchy_keys(level: Level) -> list[str]:
    keys = ["PatientID"]
    if _level_index(level) >= 1:
        keys.append("StudyInstanceUID")
    if _level_index(level) >= 2:
        keys.append("SeriesInstanceUID")
    if _level_index(level) >= 3:
        keys.append("SOPInstanceUID")
    return keys
