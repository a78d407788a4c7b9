"""Extended query attributes in the index: values, matching and backfill progress (SQL).

One row per distinct value of a configured attribute per owning entity
(``level`` + ``owner_pk``: the pk of the patient, study, series or instance
row). Adding an attribute to the configuration needs no DDL: its rows are
written by the indexer from then on and by the backfill for what is already
stored. Called from ``SqlIndex``; no other module writes this SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    and_,
    delete,
    exists,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from vna.adapters.index.conditions import text_condition
from vna.adapters.index.schema import instances, metadata, series, studies
from vna.dicom.extended import ExtraValue
from vna.dicom.matching import VALUE_LENGTH, Level, Match, MatchKind
from vna.ports import BackfillState, StoredHeader

extra_attributes = Table(
    "extra_attributes",
    metadata,
    Column("level", String(8), primary_key=True),
    Column("tag", String(96), primary_key=True),
    Column("owner_pk", Integer, primary_key=True),
    Column("value_text", String(VALUE_LENGTH), primary_key=True),
    Column("value_num", Float, nullable=True),
)
# Matching reads (level, tag, value) and correlates on owner_pk: both in the index.
Index("ix_extra_text", extra_attributes.c.level, extra_attributes.c.tag,
      extra_attributes.c.value_text, extra_attributes.c.owner_pk)
Index("ix_extra_num", extra_attributes.c.level, extra_attributes.c.tag,
      extra_attributes.c.value_num, extra_attributes.c.owner_pk)

extra_backfill = Table(
    "extra_backfill",
    metadata,
    Column("progress_key", String(112), primary_key=True),
    Column("last_instance_pk", Integer, nullable=False, default=0),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

TABLES = [extra_attributes, extra_backfill]


def _insert(conn: Connection, table: Table) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def write_values(conn: Connection, values: Sequence[tuple[int, ExtraValue]]) -> None:
    """Insert ``(owner_pk, value)`` rows; rows already there are kept (idempotent)."""
    if not values:
        return
    rows = {(v.level.value, v.key, pk, v.value_text): v.value_num for pk, v in values}
    # In key order: concurrent writers (indexers, a backfill) of the same series
    # take their row locks in one order and cannot deadlock on PostgreSQL.
    conn.execute(
        _insert(conn, extra_attributes).on_conflict_do_nothing(),
        [{"level": level, "tag": tag, "owner_pk": pk, "value_text": text, "value_num": num}
         for (level, tag, pk, text), num in sorted(rows.items())],
    )


def owned_values(values: Sequence[ExtraValue], owners: Mapping[Level, int]
                 ) -> list[tuple[int, ExtraValue]]:
    return [(owners[v.level], v) for v in values]


def condition(m: Match, owner_pk: Any) -> ColumnElement[bool]:
    """``m`` on an extended attribute: some value row of the owning entity matches."""
    attr = m.extended
    assert attr is not None
    e = extra_attributes.c
    base = and_(e.level == attr.level.value, e.tag == attr.key, e.owner_pk == owner_pk)
    if attr.numeric:
        nums = [float(v) if v else None for v in m.values]
        if m.kind is MatchKind.SINGLE:
            cond: ColumnElement[bool] = e.value_num == nums[0]
        elif m.kind is MatchKind.LIST:
            cond = e.value_num.in_(nums)
        else:
            lo, hi = nums
            parts: list[ColumnElement[bool]] = [e.value_num.is_not(None)]
            if lo is not None:
                parts.append(e.value_num >= lo)
            if hi is not None:
                parts.append(e.value_num <= hi)
            cond = and_(*parts)
    else:
        cond = text_condition(m, e.value_text)
    return exists().where(and_(base, cond))


# ------------------------------------------------------------------ backfill
def progress(conn: Connection) -> dict[str, BackfillState]:
    return {
        r.progress_key: BackfillState(r.progress_key, int(r.last_instance_pk),
                                      r.completed_at is not None)
        for r in conn.execute(select(extra_backfill))
    }


def forget(conn: Connection, keep: set[str]) -> list[str]:
    """Forget the progress of attributes no longer configured; their keys.

    Their values stay (they match nothing once the attribute is not configured,
    and no value is ever deleted by a process that merely lacks the newest
    configuration); an attribute configured again is backfilled again, so the
    instances indexed in between get their values too.
    """
    dropped = [k for k in progress(conn) if k not in keep]
    if dropped:
        conn.execute(delete(extra_backfill).where(extra_backfill.c.progress_key.in_(dropped)))
    return dropped


def scan(conn: Connection, after_pk: int, limit: int) -> list[StoredHeader]:
    """Up to ``limit`` instances after ``after_pk`` in pk order, with their owners' pks."""
    stmt = (
        select(instances.c.pk, instances.c.series_pk, series.c.study_pk, studies.c.patient_pk,
               instances.c.metadata)
        .select_from(instances.join(series).join(studies))
        .where(instances.c.pk > after_pk).order_by(instances.c.pk).limit(limit)
    )
    return [
        StoredHeader(instance_pk=int(r.pk), owners={
            Level.IMAGE: int(r.pk), Level.SERIES: int(r.series_pk),
            Level.STUDY: int(r.study_pk), Level.PATIENT: int(r.patient_pk)},
            metadata_json=r.metadata)
        for r in conn.execute(stmt)
    ]


def record_progress(conn: Connection, last_pk: Mapping[str, int], completed: set[str]) -> None:
    """Upsert each attribute's progress; ``completed`` ones are marked done."""
    now = datetime.now(UTC)
    for key, pk in last_pk.items():
        stmt = _insert(conn, extra_backfill).values(
            progress_key=key, last_instance_pk=pk, updated_at=now,
            completed_at=now if key in completed else None)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["progress_key"],
            set_={"last_instance_pk": pk, "updated_at": now,
                  "completed_at": now if key in completed else None}))


def analyze(conn: Connection) -> None:
    """Refresh the planner's statistics (what autovacuum does on PostgreSQL; benchmarks)."""
    conn.exec_driver_sql("ANALYZE")
