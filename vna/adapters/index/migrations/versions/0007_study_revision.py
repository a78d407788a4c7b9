"""Studies get a revision: what WADO-RS metadata ETags and caches are keyed by.

Revision ID: 0007_study_revision
Revises: 0006_correction_journal
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_study_revision"
down_revision = "0006_correction_journal"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    # 0001 creates its tables from the current definitions, so a database made
    # from scratch has the column already; one made before this revision has not.
    if "revision" not in {c["name"] for c in sa.inspect(bind).get_columns("studies")}:
        op.add_column("studies", sa.Column("revision", sa.String(32), nullable=False,
                                           server_default=""))
    # Every study already indexed gets a revision of its own, unlike any ETag given
    # before (those hashed the instance set).
    fresh = ("md5(random()::text || clock_timestamp()::text || pk::text)"
             if bind.dialect.name == "postgresql" else "lower(hex(randomblob(16)))")
    op.execute(f"UPDATE studies SET revision = {fresh} WHERE revision = ''")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("revision")
