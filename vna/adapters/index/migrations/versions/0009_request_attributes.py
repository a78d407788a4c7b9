"""Studies keep Timezone Offset From UTC; series keep their Request Attribute Sequence.

QIDO-RS returns both (PS3.18 Tables 10.6.3-3 and -4) and matches series on the
sequence's Scheduled Procedure Step ID and Requested Procedure ID (Table 10.6.1-5).

Revision ID: 0009_request_attributes
Revises: 0008_bits_allocated
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from vna.adapters.index import sequences
from vna.adapters.index.schema import metadata
from vna.dicom.header import sequence_items

revision = "0009_request_attributes"
down_revision = "0008_bits_allocated"
branch_labels = None
depends_on = None

_BATCH = 1000
_TIMEZONE_OFFSET = "00080201"
_REQUEST_ATTRIBUTES = "00400275"


def upgrade() -> None:
    bind = op.get_bind()
    # 0001 creates its tables from the current definitions, so a database made
    # from scratch has the column already; one made before this revision has not.
    if "timezone_offset_from_utc" not in {
            c["name"] for c in sa.inspect(bind).get_columns("studies")}:
        op.add_column("studies", sa.Column("timezone_offset_from_utc", sa.String(256),
                                           nullable=False, server_default=""))
    metadata.create_all(bind=bind, tables=[sequences.request_attributes])
    _backfill(bind)


def _backfill(bind: sa.Connection) -> None:
    """Filled from the DICOM JSON the index keeps (no blob is read), in batches; only
    instances whose JSON names either attribute are parsed."""
    instances = sa.table("instances", sa.column("pk", sa.Integer),
                         sa.column("series_pk", sa.Integer), sa.column("metadata", sa.Text))
    series = sa.table("series", sa.column("pk", sa.Integer), sa.column("study_pk", sa.Integer))
    studies = sa.table("studies", sa.column("pk", sa.Integer),
                       sa.column("timezone_offset_from_utc", sa.String))
    last = 0
    while True:
        rows = bind.execute(
            sa.select(instances.c.pk, instances.c.series_pk, series.c.study_pk,
                      instances.c.metadata)
            .select_from(instances.join(series, instances.c.series_pk == series.c.pk))
            .where(instances.c.pk > last,
                   sa.or_(instances.c.metadata.contains(f'"{_TIMEZONE_OFFSET}"'),
                          instances.c.metadata.contains(f'"{_REQUEST_ATTRIBUTES}"')))
            .order_by(instances.c.pk).limit(_BATCH)).all()
        if not rows:
            return
        items = []
        for _pk, series_pk, study_pk, doc in rows:
            found = json.loads(doc)
            offset = (found.get(_TIMEZONE_OFFSET) or {}).get("Value") or []
            if offset and offset[0]:
                # From the first instance of the study that has one.
                bind.execute(studies.update().where(
                    studies.c.pk == study_pk, studies.c.timezone_offset_from_utc == ""
                ).values(timezone_offset_from_utc=str(offset[0])))
            items.append((int(series_pk), sequence_items(found)))
        sequences.write_items(bind, items)
        last = rows[-1][0]


def downgrade() -> None:
    metadata.drop_all(bind=op.get_bind(), tables=[sequences.request_attributes])
    # Not batch mode: SQLite (3.35+) drops a column in place; copying the table would
    # trip the foreign keys of the series that refer to it.
    op.drop_column("studies", "timezone_offset_from_utc")
