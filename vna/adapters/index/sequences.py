"""Sequences the index keeps item by item (``vna.dicom.matching.SEQUENCES``), in SQL.

Today one: the series' Request Attribute Sequence, which QIDO-RS matches on by
``RequestAttributesSequence.ScheduledProcedureStepID`` and
``.RequestedProcedureID`` and returns at the series level (PS3.18 Tables
10.6.1-5 and 10.6.3-4). One row per distinct item of the series' instances: its
matching attributes as columns, the item itself as DICOM JSON. A series matches
when one of its items matches every key given on the sequence (PS3.4
C.2.2.2.6). Called from ``SqlIndex`` and the migration that made the table; no
other module writes this SQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    exists,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from vna.adapters.index.conditions import text_condition
from vna.adapters.index.schema import column_name, metadata, series
from vna.dicom.matching import ITEM_VALUE_LENGTH, SEQUENCES, Match, sequence_key
from vna.model import SequenceItem

request_attributes = Table(
    "request_attributes",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("series_pk", Integer, ForeignKey("series.pk"), nullable=False),
    *(Column(column_name(key), String(ITEM_VALUE_LENGTH), nullable=False, default="")
      for key in SEQUENCES["RequestAttributesSequence"].item_keys),
    Column("item", Text, nullable=False),
    # One row per distinct item of a series; the series' look-ups use its first column.
    UniqueConstraint("series_pk", *(column_name(key) for key in
                                    SEQUENCES["RequestAttributesSequence"].item_keys),
                     name="uq_request_attributes"),
)

TABLES: dict[str, Table] = {"RequestAttributesSequence": request_attributes}


def write_items(conn: Connection, rows: Iterable[tuple[int, dict[str, list[SequenceItem]]]]
                ) -> None:
    """Insert the items of ``(series pk, items by sequence)``; rows already there are
    kept: an item of the series seen in an earlier instance, or a redelivery."""
    by_table: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for series_pk, found in rows:
        for keyword, items in found.items():
            keys = SEQUENCES[keyword].item_keys
            for item in items:
                row = {"series_pk": series_pk, "item": item.item_json,
                       **{column_name(k): item.values.get(k, "") for k in keys}}
                # The first item with these matching values is the one kept.
                by_table.setdefault(keyword, {}).setdefault(
                    (series_pk, *(item.values.get(k, "") for k in keys)), row)
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    for keyword, found_rows in by_table.items():
        # In key order: concurrent indexers of one series take their locks in one
        # order and cannot deadlock on PostgreSQL.
        conn.execute(insert(TABLES[keyword]).on_conflict_do_nothing(),
                     [found_rows[k] for k in sorted(found_rows)])


def condition(matches: Sequence[tuple[Match, list[Any] | None]]) -> ColumnElement[bool]:
    """The series that have one item matching every one of ``matches``, all on the
    same sequence (with, per match, the bound parameters to compare with, or None)."""
    split = sequence_key(matches[0][0].keyword)
    assert split is not None
    table = TABLES[split[0]]
    conditions = []
    for m, params in matches:
        found = sequence_key(m.keyword)
        assert found is not None and found[0] == split[0]
        conditions.append(text_condition(m, table.c[column_name(found[1])], params))
    return exists().where(and_(table.c.series_pk == series.c.pk, *conditions))


def items_of_series(conn: Connection, keyword: str, series_uids: Sequence[str]
                    ) -> dict[str, list[dict[str, Any]]]:
    """Series Instance UID -> the items of sequence ``keyword`` its instances hold,
    in the order the index first saw them."""
    if not series_uids:
        return {}
    table = TABLES[keyword]
    out: dict[str, list[dict[str, Any]]] = {}
    for uid, item in conn.execute(
            select(series.c.series_instance_uid, table.c.item)
            .select_from(table.join(series, table.c.series_pk == series.c.pk))
            .where(series.c.series_instance_uid.in_(sorted(set(series_uids))))
            .order_by(table.c.pk)):
        out.setdefault(uid, []).append(json.loads(item))
    return out
