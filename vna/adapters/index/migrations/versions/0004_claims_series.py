"""Claims looked up by Series Instance UID: a series belongs to one study.

Revision ID: 0004_claims_series
Revises: 0003_corrections
"""

from __future__ import annotations

from alembic import op

revision = "0004_claims_series"
down_revision = "0003_corrections"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates its tables from the current definitions, so a database made
    # from scratch has this index already; one made before this revision has not.
    op.create_index("ix_claims_series_instance_uid", "claims", ["series_instance_uid"],
                    if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_claims_series_instance_uid", table_name="claims", if_exists=True)
