"""Storage Commitment reports owed to requesters in VNA_PEERS are kept in the index,
so that one not yet delivered when the archive stops is delivered after it starts.

Revision ID: 0010_commitment_requests
Revises: 0009_request_attributes
"""

from __future__ import annotations

from alembic import op

from vna.adapters.index.schema import commitment_requests, metadata

revision = "0010_commitment_requests"
down_revision = "0009_request_attributes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates its tables from the current definitions: a database made from
    # scratch has it already (create_all checks first).
    metadata.create_all(bind=op.get_bind(), tables=[commitment_requests])


def downgrade() -> None:
    op.drop_table("commitment_requests")
