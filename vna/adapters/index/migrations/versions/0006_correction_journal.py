"""The correction journal's head: which journal entries (blobs) this index holds.

Revision ID: 0006_correction_journal
Revises: 0005_extra_attributes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_correction_journal"
down_revision = "0005_extra_attributes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "correction_journal",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("journal_key", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("correction_journal")
