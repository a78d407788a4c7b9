"""Extended query attributes: their values (EAV) and the backfill's progress.

Revision ID: 0005_extra_attributes
Revises: 0004_claims_series
"""

from __future__ import annotations

from alembic import op

from vna.adapters.index import extra
from vna.adapters.index.schema import metadata

revision = "0005_extra_attributes"
down_revision = "0004_claims_series"
branch_labels = None
depends_on = None


# Created from the table definitions as they stand at this revision; later
# revisions change them with explicit operations.
def upgrade() -> None:
    metadata.create_all(bind=op.get_bind(), tables=extra.TABLES)


def downgrade() -> None:
    metadata.drop_all(bind=op.get_bind(), tables=list(reversed(extra.TABLES)))
