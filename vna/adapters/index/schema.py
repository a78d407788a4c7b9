"""The index schema (SQLAlchemy Core). Column names: DICOM keywords in snake_case."""

from __future__ import annotations

import re

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from vna.dicom.matching import ATTRIBUTES, VALUE_LENGTH, Level

metadata = MetaData()


def column_name(keyword: str) -> str:
    """``PatientName`` -> ``patient_name``; ``PatientName_norm`` -> ``patient_name_norm``."""
    base, _, suffix = keyword.partition("_")
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", base).lower()
    return f"{snake}_{suffix}" if suffix else snake


def _attribute_columns(level: Level) -> list[Column[object]]:
    cols: list[Column[object]] = []
    for keyword, attr in ATTRIBUTES.items():
        if attr.level != level or attr.computed or keyword in ("PatientID", "IssuerOfPatientID"):
            continue
        if keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            continue
        if attr.vr in ("IS", "US", "UL", "SL", "SS"):
            cols.append(Column(column_name(keyword), Integer, nullable=True))
        else:
            cols.append(Column(column_name(keyword), String(VALUE_LENGTH), nullable=False,
                               default=""))
        if attr.vr in ("PN", "TM"):
            cols.append(Column(column_name(keyword + "_norm"), String(VALUE_LENGTH), nullable=False,
                               default=""))
    return cols


patients = Table(
    "patients",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False, default=""),
    *_attribute_columns(Level.PATIENT),
    UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patient"),
)

studies = Table(
    "studies",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False, unique=True),
    Column("patient_pk", Integer, ForeignKey("patients.pk"), nullable=False, index=True),
    *_attribute_columns(Level.STUDY),
    # (revision 0007) A new random value whenever what the study's metadata shows
    # changes: an instance indexed, a correction, merge or unmerge. WADO-RS metadata
    # ETags and caches are keyed by it. Random rather than a counter: it cannot
    # repeat when a study is removed and indexed again.
    Column("revision", String(32), nullable=False, default="", server_default=""),
)

series = Table(
    "series",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("series_instance_uid", String(64), nullable=False, unique=True),
    Column("study_pk", Integer, ForeignKey("studies.pk"), nullable=False, index=True),
    *_attribute_columns(Level.SERIES),
)

instances = Table(
    "instances",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("series_pk", Integer, ForeignKey("series.pk"), nullable=False, index=True),
    *_attribute_columns(Level.IMAGE),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("blob_key", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=True),
)

# What the store path records before it answers (claims + outbox, one transaction).
claims = Table(
    "claims",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False, index=True),
    Column("series_instance_uid", String(64), nullable=False, index=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False, default=""),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("blob_key", String(64), nullable=False),
    Column("dataset_sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)

study_patients = Table(
    "study_patients",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False, default=""),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("routing_key", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("action", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("actor", String(64), nullable=False, default=""),
    Column("subject", String(128), nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
    Column("prev_hash", String(64), nullable=False, default=""),
    Column("hash", String(64), nullable=False, default=""),
)

# Storage Commitment reports owed to requesters in VNA_PEERS (revision 0010): due
# when ``due_at`` has passed; a process delivering one holds it until ``held_until``
# (a process that died lets go when that passes).
commitment_requests = Table(
    "commitment_requests",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("requester", String(16), nullable=False),
    Column("transaction_uid", String(64), nullable=False),
    Column("items", Text, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("held_until", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Index("ix_studies_study_date", studies.c.study_date)
Index("ix_studies_accession", studies.c.accession_number)
Index("ix_patients_name", patients.c.patient_name_norm)
Index("ix_series_modality", series.c.modality)

# ---- corrections (revision 0003_corrections): metadata versions and patient merges.
# A study's metadata version N holds the whole overlay (DICOM keyword -> value) in
# force from N on; the stored bytes and the instances' stored JSON stay pristine.
study_versions = Table(
    "study_versions",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("changes", Text, nullable=False),
    Column("previous", Text, nullable=False),
    Column("attributes", Text, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("actor", String(64), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_instance_uid", "version", name="uq_study_version"),
)

patient_merges = Table(
    "patient_merges",
    metadata,
    Column("merge_ref", String(32), primary_key=True),
    Column("prior_patient_id", String(64), nullable=False),
    Column("prior_issuer_of_patient_id", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False, default=""),
    Column("prior_patient", Text, nullable=False),
    Column("survivor_created", Integer, nullable=False, default=0),
    Column("studies", Text, nullable=False),
    Column("actor", String(64), nullable=False, default=""),
    Column("merged_at", DateTime(timezone=True), nullable=False),
    Column("undone_at", DateTime(timezone=True), nullable=True),
    Column("undone_by", String(64), nullable=False, default=""),
)

Index("ix_patient_merges_prior", patient_merges.c.prior_patient_id,
      patient_merges.c.prior_issuer_of_patient_id)
Index("ix_patient_merges_survivor", patient_merges.c.patient_id,
      patient_merges.c.issuer_of_patient_id)

correction_journal = Table(
    "correction_journal",
    metadata,
    # The journal entries (vna.journal) of the corrections this index holds, in order:
    # the last row is the head the next entry chains to.
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("journal_key", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)
