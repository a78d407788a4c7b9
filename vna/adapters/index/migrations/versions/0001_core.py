"""Core index: patients, studies, series, instances, claims, outbox, audit.

Revision ID: 0001_core
Revises:
"""

from __future__ import annotations

from alembic import op

from vna.adapters.index import schema

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

# The initial schema is created from the table definitions as they stood at
# this revision; later revisions change it with explicit operations.
_TABLES = ["patients", "studies", "series", "instances", "claims", "study_patients",
           "outbox", "audit"]


def upgrade() -> None:
    bind = op.get_bind()
    tables = [schema.metadata.tables[name] for name in _TABLES]
    schema.metadata.create_all(bind=bind, tables=tables)


def downgrade() -> None:
    bind = op.get_bind()
    tables = [schema.metadata.tables[name] for name in reversed(_TABLES)]
    schema.metadata.drop_all(bind=bind, tables=tables)
