"""Instances keep Bits Allocated: QIDO-RS returns it (PS3.18 Table 10.6.3-5).

Revision ID: 0008_bits_allocated
Revises: 0007_study_revision
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0008_bits_allocated"
down_revision = "0007_study_revision"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    bind = op.get_bind()
    # 0001 creates its tables from the current definitions, so a database made
    # from scratch has the column already; one made before this revision has not.
    if "bits_allocated" not in {c["name"] for c in sa.inspect(bind).get_columns("instances")}:
        op.add_column("instances", sa.Column("bits_allocated", sa.Integer, nullable=True))
    # Filled from the DICOM JSON the index keeps (no blob is read), in batches.
    instances = sa.table("instances", sa.column("pk", sa.Integer),
                         sa.column("metadata", sa.Text),
                         sa.column("bits_allocated", sa.Integer))
    last = 0
    while True:
        rows = bind.execute(
            sa.select(instances.c.pk, instances.c.metadata)
            .where(instances.c.pk > last, instances.c.bits_allocated.is_(None))
            .order_by(instances.c.pk).limit(_BATCH)).all()
        if not rows:
            return
        for pk, doc in rows:
            bits = _bits_allocated(doc)
            if bits is not None:
                bind.execute(instances.update().where(instances.c.pk == pk)
                             .values(bits_allocated=bits))
        last = rows[-1][0]


def _bits_allocated(doc: str) -> int | None:
    try:
        values = json.loads(doc).get("00280100", {}).get("Value") or []
        return int(values[0]) if len(values) == 1 else None
    except (ValueError, TypeError, AttributeError):
        return None


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("bits_allocated")
