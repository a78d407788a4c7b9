"""Patient/order corrections and patient merges in the SQL index (issue #4, index side).

Metadata versions
    Every correction, merge and unmerge of a study appends a row to
    ``study_versions``: version N (1, 2, ...), what it set (``changes``), what was
    shown before (``previous``), the whole overlay in force from N on
    (``attributes``), reason, actor and time. Version 0 is the study as received.
    The queryable columns (patients/studies/series/instances) are updated to the
    corrected values; the instances' stored DICOM JSON and the blobs are never
    rewritten. Readers lay the current overlay over the pristine JSON
    (``SqlIndex.metadata``, QIDO/C-FIND extra return keys); ``metadata(...,
    version=N)`` shows the study as of version N, and the version number is part
    of the WADO-RS metadata ETag so cached metadata is not served stale.

Retrieved bytes
    WADO-RS instance retrieval and C-GET/C-MOVE of a corrected study send a
    corrected copy (the overlay applied to the decoded data set, re-encoded in
    the stored transfer syntax, pixel data untouched), as dcm4chee and Orthanc
    do: a PACS that receives the images must file them under the right patient.
    The stored blob (content address = SHA-256 of the received bytes) stays
    pristine and is served as received by
    ``GET /worklist/studies/{study}/instances/{sop}/pristine``.

Patient merge (ADT^A40)
    The prior patient's studies move under the surviving patient (each gets a
    ``merge`` version setting PatientID, IssuerOfPatientID and the survivor's
    patient-level attributes). ``patient_merges`` records the prior patient's
    row, the studies moved and the version each got, so that unmerge restores
    exactly the prior state (an ``unmerge`` version reverting those keys to what
    they were before the merge). The prior patient's row is kept (a patient
    without studies is not listed), so unmerge puts the studies back under the
    very row they left. While a merge is active, a query on the prior Patient ID
    matches the survivor's studies, reported under the survivor. Images received
    without an Issuer of Patient ID are taken to be in the RIS's domain (as the
    worklist's binder takes them): merging (P, HOSP) also moves (P, "").
    Chains are followed (A -> B, then B -> C: a query on A finds C's studies);
    merging into a patient that was itself merged away is refused, so there are
    no cycles, and an unmerge is refused while a later merge holds its studies.

Store path
    A study's received identity (``study_patients``) is kept. A new instance of
    a corrected or merged study is accepted when it carries either the received
    identity or the current one, and is shown corrected; any other Patient ID is
    still a conflict (design invariant 5). A new study that arrives under a
    merged-away Patient ID is filed under the survivor as the indexer adds it
    (``after_upsert``) and joins the merge's record, so unmerge takes it back.

Every step is audited through the index's hash chain, in the same transaction.

Journal (``vna.journal``)
    So that ``vna reindex`` can rebuild all this from the blob store alone, every
    correction, merge, join (a study following a merge as it arrives) and unmerge
    is also written as a journal entry to the blob store, from inside its
    transaction, before the commit; the entry's key is recorded in
    ``correction_journal`` in the same transaction (the chain's head). Replay
    (``replay``) runs the same code with the entry's time, merge reference,
    studies moved, values set and values shown before taken from the entry (a
    rebuilt index may hold another instance's spelling in a patient row), and
    reports where its own outcome differs from what the entry recorded. An entry
    that cannot be applied (e.g. its study's blobs are gone) is reported and its
    key recorded all the same, so that the chain's head stays the last entry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, exists, func, select, text, union
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from vna.adapters.index.schema import (
    column_name,
    correction_journal,
    instances,
    patient_merges,
    patients,
    series,
    studies,
    study_versions,
)
from vna.dicom.corrections import (
    CorrectionError,
    UnknownStudy,
    apply_to_json,
    check_changes,
    json_text,
)
from vna.dicom.matching import ATTRIBUTES, Level, normalize_person_name, stored_time
from vna.journal import JournalEntry
from vna.ports import Unavailable

if TYPE_CHECKING:
    from vna.adapters.index.sqlalchemy import SqlIndex

_IDENTITY = ("PatientID", "IssuerOfPatientID")
_INTEGER_VRS = ("IS", "US", "UL", "SL", "SS")
PATIENT_KEYWORDS = tuple(
    k for k, a in ATTRIBUTES.items()
    if a.level is Level.PATIENT and not a.computed and k not in _IDENTITY)


def _now() -> datetime:
    return datetime.now(UTC)


def version_ref(study_instance_uid: str, version: int) -> str:
    return f"{study_instance_uid}@{version}"


# ------------------------------------------------------------------ reading overlays
def overlays(conn: Connection, study_uids: list[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """(current version, overlay) of each corrected study among ``study_uids``."""
    if not study_uids:
        return {}
    latest = (
        select(study_versions.c.study_instance_uid.label("uid"),
               func.max(study_versions.c.version).label("v"))
        .where(study_versions.c.study_instance_uid.in_(study_uids))
        .group_by(study_versions.c.study_instance_uid).subquery()
    )
    stmt = select(study_versions.c.study_instance_uid, study_versions.c.version,
                  study_versions.c.attributes).join(
        latest, and_(latest.c.uid == study_versions.c.study_instance_uid,
                     latest.c.v == study_versions.c.version))
    return {uid: (int(v), json.loads(attrs)) for uid, v, attrs in conn.execute(stmt)}


def overlay_of(conn: Connection, study_uid: str, version: int | None = None
               ) -> tuple[int, dict[str, str]]:
    """(version, overlay) of the study now, or as of ``version`` (0: as received)."""
    stmt = select(study_versions.c.version, study_versions.c.attributes).where(
        study_versions.c.study_instance_uid == study_uid)
    if version is not None:
        if version == 0:
            return 0, {}
        stmt = stmt.where(study_versions.c.version == version)
    row = conn.execute(stmt.order_by(study_versions.c.version.desc()).limit(1)).first()
    if row is None:
        if version is not None:
            raise LookupError(f"study has no metadata version {version}")
        return 0, {}
    return int(row.version), json.loads(row.attributes)


def overlay_docs(docs: list[str], overlay: Mapping[str, str]) -> list[str]:
    """Stored DICOM JSON strings with ``overlay`` applied (unchanged when it is empty)."""
    if not overlay:
        return docs
    return [json.dumps(apply_to_json(json.loads(d), overlay), separators=(",", ":"))
            for d in docs]


def versions(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(study_versions).where(study_versions.c.study_instance_uid == study_uid)
        .order_by(study_versions.c.version)).all()
    return [{
        "version": r.version, "kind": r.kind, "changes": json.loads(r.changes),
        "previous": json.loads(r.previous), "attributes": json.loads(r.attributes),
        "reason": r.reason, "actor": r.actor, "created_at": r.created_at,
    } for r in rows]


# ------------------------------------------------------------------ queries and claims
def _merge_chain() -> Any:
    """Active merges, followed transitively: (prior identity, final survivor identity)."""
    m = patient_merges.alias("m")
    base = select(patient_merges.c.prior_patient_id, patient_merges.c.prior_issuer_of_patient_id,
                  patient_merges.c.patient_id, patient_merges.c.issuer_of_patient_id
                  ).where(patient_merges.c.undone_at.is_(None)).cte("merge_chain", recursive=True)
    return base.union(
        select(base.c.prior_patient_id, base.c.prior_issuer_of_patient_id, m.c.patient_id,
               m.c.issuer_of_patient_id)
        .where(and_(m.c.prior_patient_id == base.c.patient_id,
                    m.c.prior_issuer_of_patient_id == base.c.issuer_of_patient_id,
                    m.c.undone_at.is_(None))))


_CHAIN = _merge_chain()
PRIOR_COLUMNS = {"PatientID": _CHAIN.c.prior_patient_id,
                 "IssuerOfPatientID": _CHAIN.c.prior_issuer_of_patient_id}


def merged_into_condition(prior_conditions: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    """Patients (correlated ``patients`` row) that a prior patient matching
    ``prior_conditions`` (over ``PRIOR_COLUMNS``) was merged into, through any
    chain of active merges (A -> B -> C: A finds C)."""
    cond: ColumnElement[bool] = exists().where(and_(
        _CHAIN.c.patient_id == patients.c.patient_id,
        _CHAIN.c.issuer_of_patient_id == patients.c.issuer_of_patient_id,
        *prior_conditions,
    ))
    return cond


def identity_patients(conditions: Callable[[Any], list[ColumnElement[bool]]],
                      prior_conditions: list[ColumnElement[bool]]) -> Any:
    """The pks of the patients whose identity columns meet ``conditions`` (given the
    patients table, aliased) or that a prior patient meeting ``prior_conditions`` (over
    ``PRIOR_COLUMNS``) was merged into: the same rows as ``conditions OR
    merged_into_condition(...)`` on the outer patients, as one uncorrelated subquery,
    so that the database starts from the identity's index instead of testing every
    row of the outer query."""
    direct = patients.alias("identity_patients")
    merged = patients.alias("merged_patients")
    return union(
        select(direct.c.pk).where(and_(*conditions(direct))),
        select(merged.c.pk).select_from(merged.join(_CHAIN, and_(
            _CHAIN.c.patient_id == merged.c.patient_id,
            _CHAIN.c.issuer_of_patient_id == merged.c.issuer_of_patient_id)))
        .where(and_(*prior_conditions)),
    )


def current_identity(conn: Connection, study_uid: str) -> tuple[str, str] | None:
    """(Patient ID, Issuer) the indexed study is filed under now (None if not indexed)."""
    row = conn.execute(
        select(patients.c.patient_id, patients.c.issuer_of_patient_id)
        .select_from(studies.join(patients))
        .where(studies.c.study_instance_uid == study_uid)).first()
    return (row.patient_id, row.issuer_of_patient_id) if row else None


def touch_studies(conn: Connection, where: ColumnElement[bool]) -> None:
    """Give the studies ``where`` selects a new revision: what their metadata shows
    changed (in the transaction of the change, so readers see both or neither)."""
    conn.execute(studies.update().where(where).values(revision=uuid.uuid4().hex))


def after_upsert(index: SqlIndex, conn: Connection, patient_id: str, study_uid: str) -> None:
    """The indexer's hook: a study arriving under a merged-away Patient ID follows the
    merge (one indexed look-up when there is none)."""
    if conn.execute(select(patient_merges.c.merge_ref).where(and_(
            patient_merges.c.prior_patient_id == patient_id,
            patient_merges.c.undone_at.is_(None))).limit(1)).first() is not None:
        Corrections(index).follow_merges(conn, study_uid)


# ------------------------------------------------------------------ writing
def _column_values(level: Level, changes: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword, value in changes.items():
        attr = ATTRIBUTES.get(keyword)
        if attr is None or attr.level is not level or attr.computed or keyword in _IDENTITY:
            continue
        if attr.vr in _INTEGER_VRS:
            try:
                out[column_name(keyword)] = int(value) if value.strip() else None
            except ValueError:
                out[column_name(keyword)] = None
            continue
        out[column_name(keyword)] = value
        if attr.vr == "PN":
            out[column_name(keyword + "_norm")] = normalize_person_name(value)
        elif attr.vr == "TM":
            out[column_name(keyword + "_norm")] = stored_time(value)
    return out


def _patient_columns(row: Any) -> dict[str, Any]:
    """A patients row's attribute columns (everything but pk and the identity)."""
    if row is None:
        return {}
    data = dict(row._mapping)
    for key in ("pk", "patient_id", "issuer_of_patient_id"):
        data.pop(key, None)
    return data


def _patient_text(row: Any, keyword: str) -> str:
    value = row._mapping[column_name(keyword)]
    return "" if value is None else str(value)


def journal_keys(conn: Connection) -> set[str]:
    return set(conn.execute(select(correction_journal.c.journal_key)).scalars())


class Corrections:
    """The write side, over one ``SqlIndex`` (its write transactions and audit chain).

    ``replay``: the journal entry being replayed (its time and identifiers are
    used, nothing is written to the journal, and ``mismatch`` says where the
    outcome differs from the entry).
    """

    def __init__(self, index: SqlIndex, replay: JournalEntry | None = None) -> None:
        self.index = index
        self.replay = replay
        self.at = datetime.fromisoformat(replay.at) if replay is not None else _now()
        self.mismatch = ""
        self.recorded = False

    # ---------------------------------------------------------- journal
    def _audit(self, conn: Connection, action: str, *, actor: str, subject: str,
               detail: str) -> None:
        if self.replay is not None:
            detail += f"; replayed from journal {self.replay.key} of {self.replay.at}"
        self.index._append_audit(conn, action, "success", actor=actor, subject=subject,
                                 detail=detail)

    def _differs(self, what: str, replayed: Any, recorded: Any) -> None:
        if self.replay is not None and replayed != recorded:
            self.mismatch += f"{what}: replayed {replayed!r}, journal {recorded!r}; "

    def _journal(self, conn: Connection, kind: str, body: dict[str, Any]) -> None:
        """Record the change in the journal (blob first, then its key in this
        transaction); a replay records the replayed entry's key."""
        if self.index.dialect == "postgresql":
            # One journal writer at a time, to the commit: each entry names the head.
            conn.execute(text("SELECT pg_advisory_xact_lock(74213)"))
        head = conn.execute(select(correction_journal.c.seq, correction_journal.c.journal_key)
                            .order_by(correction_journal.c.seq.desc()).limit(1)).first()
        seq = int(head.seq) + 1 if head is not None else 1
        if self.replay is not None:
            key = self.replay.key
        elif self.index.journal is None:
            return
        else:
            key = self.index.journal.write({
                "kind": kind, "seq": seq, "prev": head.journal_key if head else "",
                "at": self.at.isoformat(), **body})
        conn.execute(correction_journal.insert().values(
            seq=seq, journal_key=key, kind=kind, recorded_at=_now()))
        self.recorded = True

    # ---------------------------------------------------------- helpers
    def _lock_study(self, conn: Connection, study_uid: str) -> Any:
        stmt = select(studies.c.pk, studies.c.patient_pk).where(
            studies.c.study_instance_uid == study_uid)
        if self.index.dialect == "postgresql":
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            raise UnknownStudy(f"study {study_uid} is not in the index")
        return row

    def _shown(self, conn: Connection, study_pk: int, overlay: Mapping[str, str]
               ) -> dict[str, Any]:
        """The first instance's metadata as readers see it now."""
        doc = conn.execute(
            select(instances.c.metadata).select_from(instances.join(series))
            .where(series.c.study_pk == study_pk).order_by(instances.c.pk).limit(1)).scalar()
        return apply_to_json(json.loads(doc) if doc else {}, overlay)

    def _patient(self, conn: Connection, patient_id: str, issuer: str) -> Any:
        return conn.execute(select(patients).where(and_(
            patients.c.patient_id == patient_id,
            patients.c.issuer_of_patient_id == issuer))).first()

    def _patient_pk(self, conn: Connection, patient_id: str, issuer: str,
                    columns: Mapping[str, Any]) -> int:
        """The patient's row, created with ``columns`` when absent, updated otherwise."""
        row = self._patient(conn, patient_id, issuer)
        if row is None:
            conn.execute(patients.insert().values(patient_id=patient_id,
                                                  issuer_of_patient_id=issuer, **columns))
            row = self._patient(conn, patient_id, issuer)
            assert row is not None
        elif columns:
            conn.execute(patients.update().where(patients.c.pk == row.pk).values(**columns))
        return int(row.pk)

    def _drop_if_empty(self, conn: Connection, patient_pk: int) -> None:
        if not conn.execute(select(studies.c.pk).where(studies.c.patient_pk == patient_pk)
                            .limit(1)).first():
            conn.execute(patients.delete().where(patients.c.pk == patient_pk))

    def _add_version(self, conn: Connection, study_uid: str, version: int, kind: str,
                     changes: Mapping[str, str], previous: Mapping[str, str],
                     attributes: Mapping[str, str], reason: str, actor: str) -> None:
        conn.execute(study_versions.insert().values(
            study_instance_uid=study_uid, version=version, kind=kind,
            changes=json.dumps(dict(changes), sort_keys=True),
            previous=json.dumps(dict(previous), sort_keys=True),
            attributes=json.dumps(dict(attributes), sort_keys=True),
            reason=reason, actor=actor[:64], created_at=self.at))
        touch_studies(conn, studies.c.study_instance_uid == study_uid)

    def _apply_columns(self, conn: Connection, study: Any, changes: Mapping[str, str]
                       ) -> None:
        """Bring the queryable columns of the study (and its patient) to ``changes``."""
        current = conn.execute(select(patients).where(patients.c.pk == study.patient_pk)).one()
        patient_id = changes.get("PatientID", current.patient_id)
        issuer = changes.get("IssuerOfPatientID", current.issuer_of_patient_id)
        patient_cols = _column_values(Level.PATIENT, changes)
        if (patient_id, issuer) != (current.patient_id, current.issuer_of_patient_id):
            target = self._patient(conn, patient_id, issuer)
            columns = patient_cols if target is not None else {
                **_patient_columns(current), **patient_cols}
            target_pk = self._patient_pk(conn, patient_id, issuer, columns)
            conn.execute(studies.update().where(studies.c.pk == study.pk)
                         .values(patient_pk=target_pk))
        elif patient_cols:
            conn.execute(patients.update().where(patients.c.pk == study.patient_pk)
                         .values(**patient_cols))
        if cols := _column_values(Level.STUDY, changes):
            conn.execute(studies.update().where(studies.c.pk == study.pk).values(**cols))
        if cols := _column_values(Level.SERIES, changes):
            conn.execute(series.update().where(series.c.study_pk == study.pk).values(**cols))
        if cols := _column_values(Level.IMAGE, changes):
            conn.execute(instances.update().where(instances.c.series_pk.in_(
                select(series.c.pk).where(series.c.study_pk == study.pk))).values(**cols))

    def _run(self, work: Any) -> Any:
        try:
            with self.index.write_transaction() as conn:
                return work(conn)
        except (CorrectionError, LookupError):
            raise
        except SQLAlchemyError as exc:
            raise Unavailable(f"index database: {exc}") from exc

    def replay_entry(self) -> str:
        """Apply the journal entry given as ``replay``; '' or what differed."""
        entry = self.replay
        assert entry is not None
        doc = entry.doc
        try:
            if entry.kind == "correction":
                ref = self.correct_study(str(doc["study"]), doc["changes"],
                                         reason=str(doc["reason"]), actor=str(doc["actor"]))
                self._differs("version", ref, version_ref(str(doc["study"]),
                                                          int(doc["version"])))
            elif entry.kind == "merge":
                self.merge_patients(
                    str(doc["prior_patient_id"]), str(doc["prior_issuer_of_patient_id"]),
                    str(doc["patient_id"]), str(doc["issuer_of_patient_id"]),
                    actor=str(doc["actor"]))
            elif entry.kind == "join":
                self._run(lambda conn: self._replay_join(conn, doc))
            else:
                self.unmerge_patients(str(doc["merge_ref"]), actor=str(doc["actor"]))
        except (CorrectionError, LookupError, KeyError, TypeError, ValueError) as exc:
            self.mismatch += f"not applied: {exc}; "
        if not self.recorded:
            # The key is recorded all the same: it is the head the next entry chains to.
            self._run(lambda conn: self._journal(conn, entry.kind, {}))
            self.mismatch = self.mismatch or "changed nothing; "
        return self.mismatch.rstrip("; ")

    def _replay_join(self, conn: Connection, doc: Mapping[str, Any]) -> None:
        uid = str(doc["study"])
        merge = conn.execute(select(patient_merges).where(
            patient_merges.c.merge_ref == str(doc["merge_ref"]))).first()
        if merge is None or merge.undone_at is not None:
            raise CorrectionError(f"merge {doc['merge_ref']} is not active")
        row = conn.execute(
            select(studies.c.pk, patients.c.pk.label("patient_pk"), patients.c.patient_id,
                   patients.c.issuer_of_patient_id)
            .select_from(studies.join(patients))
            .where(studies.c.study_instance_uid == uid)).first()
        if row is None:
            raise UnknownStudy(f"study {uid} is not in the index")
        if [row.patient_id, row.issuer_of_patient_id] != list(doc["arrived_as"]):
            raise CorrectionError(f"study {uid} is not filed as it arrived")
        self._join_merge(conn, merge, row, uid)

    # ---------------------------------------------------------- corrections
    def correct_study(self, study_instance_uid: str, changes: Mapping[str, str], *,
                      reason: str, actor: str) -> str:
        wanted = check_changes(changes)

        def work(conn: Connection) -> str:
            study = self._lock_study(conn, study_instance_uid)
            version, overlay = overlay_of(conn, study_instance_uid)
            shown = self._shown(conn, study.pk, overlay)
            effective = {k: v for k, v in wanted.items() if json_text(shown, k) != v}
            subject = f"study:{study_instance_uid}"
            if not effective:
                self._audit(conn, "study.corrected", actor=actor, subject=subject,
                            detail=f"version={version} unchanged; {reason}")
                return version_ref(study_instance_uid, version)
            previous = {k: json_text(shown, k) for k in effective}
            if self.replay is not None:
                self._differs("changes", effective, self.replay.doc.get("changes"))
                self._differs("previous", previous, self.replay.doc.get("previous"))
                # The history shows what was shown then (instance order may differ now).
                previous = dict(self.replay.doc["previous"])
            self._add_version(conn, study_instance_uid, version + 1, "correction", effective,
                              previous, {**overlay, **effective}, reason, actor)
            self._apply_columns(conn, study, effective)
            self._journal(conn, "correction", {
                "study": study_instance_uid, "version": version + 1, "changes": effective,
                "previous": previous, "reason": reason, "actor": actor})
            self._audit(
                conn, "study.corrected", actor=actor, subject=subject,
                detail=f"version={version + 1} keys={','.join(sorted(effective))}; {reason}")
            return version_ref(study_instance_uid, version + 1)

        ref: str = self._run(work)
        return ref

    # ---------------------------------------------------------- merges
    def merge_patients(self, prior_patient_id: str, prior_issuer: str, patient_id: str,
                       issuer: str, *, actor: str) -> str:
        if not prior_patient_id or not patient_id:
            raise CorrectionError("both Patient IDs are required")
        if (prior_patient_id, prior_issuer) == (patient_id, issuer):
            raise CorrectionError("a patient cannot be merged into itself")
        merge_ref = uuid.uuid4().hex
        # A replay moves what the merge moved then, not studies that came later.
        only = self.replay.doc if self.replay is not None else None
        if only is not None:
            merge_ref = str(only["merge_ref"])

        def work(conn: Connection) -> str:
            active = conn.execute(select(patient_merges.c.merge_ref).where(and_(
                patient_merges.c.prior_patient_id == prior_patient_id,
                patient_merges.c.prior_issuer_of_patient_id == prior_issuer,
                patient_merges.c.undone_at.is_(None)))).first()
            if active is not None:
                raise CorrectionError("prior patient was already merged")
            if conn.execute(select(patient_merges.c.merge_ref).where(and_(
                    patient_merges.c.prior_patient_id == patient_id,
                    patient_merges.c.prior_issuer_of_patient_id == issuer,
                    patient_merges.c.undone_at.is_(None)))).first() is not None:
                raise CorrectionError("surviving patient was itself merged into another")
            # Images sent without an Issuer of Patient ID are taken to be in the RIS's
            # domain, as the worklist's binder takes them.
            issuers = [prior_issuer, ""] if prior_issuer and (patient_id, issuer) != (
                prior_patient_id, "") else [prior_issuer]
            if only is not None:
                issuers = [i for i in issuers if i in only["prior_issuers"]]
            priors = [p for p in (self._patient(conn, prior_patient_id, i) for i in issuers)
                      if p is not None]
            survivor = self._patient(conn, patient_id, issuer)
            moved: dict[str, tuple[int, str]] = {}
            survivor_created = False
            changes: dict[str, str] = {}
            if priors:
                changes = {"PatientID": patient_id, "IssuerOfPatientID": issuer}
                if survivor is not None:
                    changes.update({k: _patient_text(survivor, k) for k in PATIENT_KEYWORDS})
                    survivor_pk = int(survivor.pk)
                else:
                    survivor_created = True
                    survivor_pk = self._patient_pk(conn, patient_id, issuer,
                                                   _patient_columns(priors[0]))
            prior_record = {p.issuer_of_patient_id: _patient_columns(p) for p in priors}
            if only is not None:
                # A rebuilt patient row may hold another instance's spelling: the merge
                # sets, and its undo restores, what it did then.
                self._differs("changes", changes, only.get("changes", changes))
                self._differs("prior patient", prior_record,
                              only.get("prior_patient", prior_record))
                changes = dict(only.get("changes", changes))
                prior_record = dict(only.get("prior_patient", prior_record))
            for prior in priors:
                for uid, pk in conn.execute(
                        select(studies.c.study_instance_uid, studies.c.pk)
                        .where(studies.c.patient_pk == prior.pk).order_by(studies.c.pk)).all():
                    if only is not None and uid not in only["studies"]:
                        continue
                    moved[uid] = (self._merge_version(conn, uid, pk, changes, merge_ref,
                                                      actor), prior.issuer_of_patient_id)
                    # The prior patient's row stays (without studies it is not listed),
                    # so that unmerge puts the studies back under the very same row.
                    conn.execute(studies.update().where(studies.c.pk == pk)
                                 .values(patient_pk=survivor_pk))
            conn.execute(patient_merges.insert().values(
                merge_ref=merge_ref, prior_patient_id=prior_patient_id,
                prior_issuer_of_patient_id=prior_issuer, patient_id=patient_id,
                issuer_of_patient_id=issuer,
                prior_patient=json.dumps(prior_record),
                survivor_created=int(survivor_created), studies=json.dumps(moved),
                actor=actor[:64], merged_at=self.at, undone_at=None, undone_by=""))
            recorded = {uid: [v, i] for uid, (v, i) in moved.items()}
            if only is not None:
                self._differs("studies moved", recorded, only["studies"])
            self._journal(conn, "merge", {
                "merge_ref": merge_ref, "prior_patient_id": prior_patient_id,
                "prior_issuer_of_patient_id": prior_issuer, "patient_id": patient_id,
                "issuer_of_patient_id": issuer, "actor": actor,
                "prior_issuers": [p.issuer_of_patient_id for p in priors],
                "prior_patient": prior_record, "changes": changes, "studies": recorded})
            self._audit(
                conn, "studies.merged", actor=actor,
                subject=f"patient:{prior_patient_id}^{prior_issuer}",
                detail=f"into={patient_id}^{issuer} merge={merge_ref} studies={len(moved)}")
            return merge_ref

        ref: str = self._run(work)
        return ref

    def _merge_version(self, conn: Connection, uid: str, study_pk: int,
                       changes: Mapping[str, str], merge_ref: str, actor: str) -> int:
        version, overlay = overlay_of(conn, uid)
        shown = self._shown(conn, study_pk, overlay)
        self._add_version(conn, uid, version + 1, "merge", changes,
                          {k: json_text(shown, k) for k in changes},
                          {**overlay, **changes}, f"merge {merge_ref}", actor)
        return version + 1

    def follow_merges(self, conn: Connection, study_instance_uid: str) -> None:
        """File a study that arrived under a merged-away patient under the survivor.

        Called by the indexer in its transaction. The study joins the merge's record,
        so that undoing the merge takes it back too. Chains are followed one merge
        at a time; an issuer-less Patient ID that more than one merge could mean is
        left where it is.
        """
        for _ in range(32):
            row = conn.execute(
                select(studies.c.pk, patients.c.pk.label("patient_pk"),
                       patients.c.patient_id, patients.c.issuer_of_patient_id)
                .select_from(studies.join(patients))
                .where(studies.c.study_instance_uid == study_instance_uid)).first()
            if row is None:
                return
            candidates = conn.execute(select(patient_merges).where(and_(
                patient_merges.c.undone_at.is_(None),
                patient_merges.c.prior_patient_id == row.patient_id))).all()
            exact = [m for m in candidates
                     if m.prior_issuer_of_patient_id == row.issuer_of_patient_id]
            loose = [m for m in candidates if m.prior_issuer_of_patient_id
                     and not row.issuer_of_patient_id
                     and (m.patient_id, m.issuer_of_patient_id) != (row.patient_id, "")]
            found = exact or loose
            if len(found) != 1:
                return
            self._join_merge(conn, found[0], row, study_instance_uid)

    def _join_merge(self, conn: Connection, merge: Any, row: Any, uid: str) -> None:
        survivor = self._patient(conn, merge.patient_id, merge.issuer_of_patient_id)
        changes = {"PatientID": merge.patient_id,
                   "IssuerOfPatientID": merge.issuer_of_patient_id}
        if survivor is not None:
            changes.update({k: _patient_text(survivor, k) for k in PATIENT_KEYWORDS})
            survivor_pk = int(survivor.pk)
        else:
            prior = conn.execute(select(patients).where(patients.c.pk == row.patient_pk)).one()
            survivor_pk = self._patient_pk(conn, merge.patient_id, merge.issuer_of_patient_id,
                                           _patient_columns(prior))
        if self.replay is not None:
            self._differs("changes", changes, self.replay.doc.get("changes", changes))
            changes = dict(self.replay.doc.get("changes", changes))
        actor = merge.actor
        version = self._merge_version(conn, uid, row.pk, changes, merge.merge_ref, actor)
        conn.execute(studies.update().where(studies.c.pk == row.pk)
                     .values(patient_pk=survivor_pk))
        moved = json.loads(merge.studies)
        moved[uid] = (version, row.issuer_of_patient_id)
        priors = json.loads(merge.prior_patient)
        if row.issuer_of_patient_id not in priors:
            prior = conn.execute(select(patients).where(patients.c.pk == row.patient_pk)).one()
            priors[row.issuer_of_patient_id] = _patient_columns(prior)
            if self.replay is not None and "prior_patient" in self.replay.doc:
                priors[row.issuer_of_patient_id] = self.replay.doc["prior_patient"]
        conn.execute(patient_merges.update()
                     .where(patient_merges.c.merge_ref == merge.merge_ref)
                     .values(studies=json.dumps(moved), prior_patient=json.dumps(priors)))
        if self.replay is not None:
            self._differs("version", version, self.replay.doc.get("version"))
        self._journal(conn, "join", {
            "merge_ref": merge.merge_ref, "study": uid, "version": version, "changes": changes,
            "prior_patient": priors.get(row.issuer_of_patient_id),
            "arrived_as": [row.patient_id, row.issuer_of_patient_id]})
        self._audit(
            conn, "studies.merged", actor="index",
            subject=f"study:{uid}",
            detail=f"arrived as {row.patient_id}^{row.issuer_of_patient_id} after merge="
                   f"{merge.merge_ref}; filed under "
                   f"{merge.patient_id}^{merge.issuer_of_patient_id}")

    def unmerge_patients(self, merge_ref: str, *, actor: str) -> None:
        def work(conn: Connection) -> None:
            stmt = select(patient_merges).where(patient_merges.c.merge_ref == merge_ref)
            if self.index.dialect == "postgresql":
                stmt = stmt.with_for_update()
            merge = conn.execute(stmt).first()
            if merge is None:
                raise LookupError(f"no merge {merge_ref}")
            if merge.undone_at is not None:
                return  # already undone: a retried undo changes nothing
            moved: dict[str, list[Any]] = json.loads(merge.studies)
            survivor = self._patient(conn, merge.patient_id, merge.issuer_of_patient_id)
            if moved:
                if survivor is None:
                    raise CorrectionError("the surviving patient is no longer in the index")
                prior_columns: dict[str, dict[str, Any]] = json.loads(merge.prior_patient)
                prior_pks = {
                    prior_issuer: self._patient_pk(conn, merge.prior_patient_id, prior_issuer,
                                                   columns)
                    for prior_issuer, columns in prior_columns.items()}
                for uid, (merged_version, prior_issuer) in moved.items():
                    self._unmerge_study(conn, merge, uid, int(merged_version),
                                        int(survivor.pk), prior_pks[prior_issuer], actor)
                if merge.survivor_created:
                    self._drop_if_empty(conn, int(survivor.pk))
            conn.execute(patient_merges.update().where(patient_merges.c.merge_ref == merge_ref)
                         .values(undone_at=self.at, undone_by=actor[:64]))
            if self.replay is not None:
                self._differs("studies", sorted(moved), self.replay.doc.get("studies"))
            self._journal(conn, "unmerge", {"merge_ref": merge_ref, "actor": actor,
                                            "studies": sorted(moved)})
            self._audit(
                conn, "studies.unmerged", actor=actor,
                subject=f"patient:{merge.prior_patient_id}^{merge.prior_issuer_of_patient_id}",
                detail=f"from={merge.patient_id}^{merge.issuer_of_patient_id} "
                       f"merge={merge_ref} studies={len(moved)}")

        self._run(work)

    def _unmerge_study(self, conn: Connection, merge: Any, uid: str, merged_version: int,
                       survivor_pk: int, prior_pk: int, actor: str) -> None:
        study = self._lock_study(conn, uid)
        if study.patient_pk != survivor_pk:
            raise CorrectionError(
                f"study {uid} moved on since the merge; undo the later change first")
        merged = conn.execute(select(study_versions.c.changes).where(and_(
            study_versions.c.study_instance_uid == uid,
            study_versions.c.version == merged_version))).scalar_one()
        _, before = overlay_of(conn, uid, merged_version - 1)
        version, overlay = overlay_of(conn, uid)
        shown = self._shown(conn, study.pk, overlay)
        restored = dict(overlay)
        for keyword in json.loads(merged):
            if keyword in before:
                restored[keyword] = before[keyword]
            else:
                restored.pop(keyword, None)
        pristine = self._shown(conn, study.pk, {})
        keys = json.loads(merged)
        changes = {k: restored.get(k, json_text(pristine, k)) for k in keys}
        self._add_version(conn, uid, version + 1, "unmerge", changes,
                          {k: json_text(shown, k) for k in keys}, restored,
                          f"unmerge {merge.merge_ref}", actor)
        conn.execute(studies.update().where(studies.c.pk == study.pk)
                     .values(patient_pk=prior_pk))
