"""Worklist: RIS patients, orders, MPPS, bindings, reconciliation, merges, HL7 control ids.

Revision ID: 0002_worklist
Revises: 0001_core
"""

from __future__ import annotations

from alembic import op

from vna.adapters.index import worklist_schema

revision = "0002_worklist"
down_revision = "0001_core"
branch_labels = None
depends_on = None


# Created from the table definitions as they stand at this revision; later
# revisions change them with explicit operations.
def upgrade() -> None:
    worklist_schema.metadata.create_all(bind=op.get_bind(), tables=worklist_schema.TABLES)


def downgrade() -> None:
    worklist_schema.metadata.drop_all(bind=op.get_bind(),
                                      tables=list(reversed(worklist_schema.TABLES)))
