"""Corrections: study metadata versions and patient merges (issue #4, index side).

Revision ID: 0003_corrections
Revises: 0002_worklist
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_corrections"
down_revision = "0002_worklist"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_versions",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("changes", sa.Text, nullable=False),
        sa.Column("previous", sa.Text, nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_instance_uid", "version", name="uq_study_version"),
    )
    op.create_table(
        "patient_merges",
        sa.Column("merge_ref", sa.String(32), primary_key=True),
        sa.Column("prior_patient_id", sa.String(64), nullable=False),
        sa.Column("prior_issuer_of_patient_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False),
        sa.Column("prior_patient", sa.Text, nullable=False),
        sa.Column("survivor_created", sa.Integer, nullable=False),
        sa.Column("studies", sa.Text, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undone_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_patient_merges_prior", "patient_merges",
                    ["prior_patient_id", "prior_issuer_of_patient_id"])
    op.create_index("ix_patient_merges_survivor", "patient_merges",
                    ["patient_id", "issuer_of_patient_id"])


def downgrade() -> None:
    op.drop_index("ix_patient_merges_survivor", table_name="patient_merges")
    op.drop_index("ix_patient_merges_prior", table_name="patient_merges")
    op.drop_table("patient_merges")
    op.drop_table("study_versions")
