"""The worklist's tables (SQLAlchemy Core), beside the index in the same database.

Audit records and events go to the index's ``audit`` and ``outbox`` tables, so
that there is one tamper-evident trail and one outbox relay for the archive.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()


def _ts(name: str, nullable: bool = False) -> Column[Any]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _s(name: str, length: int = 64) -> Column[Any]:
    return Column(name, String(length), nullable=False, default="")


wl_messages = Table(
    "wl_messages",
    metadata,
    Column("message_key", String(300), primary_key=True),
    _s("message_type", 32),
    _s("ack_code", 2),
    _ts("received_at"),
)

wl_patients = Table(
    "wl_patients",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("issuer_of_patient_id", String(64), primary_key=True),
    _s("patient_name", 320),
    _s("patient_birth_date", 8),
    _s("patient_sex", 16),
    _s("merged_into", 64),
    _ts("updated_at"),
)

wl_orders = Table(
    "wl_orders",
    metadata,
    Column("order_id", String(32), primary_key=True),
    _s("placer_order_number"),
    _s("filler_order_number"),
    _s("accession_number", 16),
    _s("requested_procedure_id", 16),
    _s("requested_procedure_description"),
    _s("requested_procedure_code_value", 16),
    _s("requested_procedure_coding_scheme", 16),
    _s("requested_procedure_code_meaning"),
    _s("scheduled_procedure_step_id", 16),
    _s("scheduled_procedure_step_description"),
    _s("modality", 16),
    _s("scheduled_station_ae_title", 16),
    _s("scheduled_station_name", 16),
    _s("scheduled_procedure_step_start_date", 8),
    _s("scheduled_procedure_step_start_time", 16),
    _s("scheduled_performing_physician_name", 320),
    _s("study_instance_uid"),
    _s("patient_id"),
    _s("issuer_of_patient_id"),
    _s("referring_physician_name", 320),
    _s("requesting_physician", 320),
    Column("reason_for_the_requested_procedure", Text, nullable=False, default=""),
    _s("admission_id"),
    _s("current_patient_location"),
    _s("status", 16),
    _ts("created_at"),
    _ts("updated_at"),
    UniqueConstraint("accession_number", "requested_procedure_id",
                     "scheduled_procedure_step_id", name="uq_wl_order_step"),
)
Index("ix_wl_orders_status", wl_orders.c.status)
Index("ix_wl_orders_study", wl_orders.c.study_instance_uid)
Index("ix_wl_orders_patient", wl_orders.c.patient_id)
Index("ix_wl_orders_placer", wl_orders.c.placer_order_number)

wl_mpps = Table(
    "wl_mpps",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    _s("status", 16),
    Column("attributes_json", Text, nullable=False),
    _s("study_instance_uid"),
    _s("accession_number", 16),
    _s("patient_id"),
    Column("order_ids", Text, nullable=False, default="[]"),
    Column("performed", Text, nullable=False, default="[]"),
    _s("performing_ae_title", 16),
    _ts("created_at"),
    _ts("updated_at"),
)
Index("ix_wl_mpps_study", wl_mpps.c.study_instance_uid)

wl_bindings = Table(
    "wl_bindings",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("order_id", String(32), primary_key=True),
    _s("accession_number", 16),
    _s("patient_id"),
    _s("issuer_of_patient_id"),
    _s("how", 16),
    _ts("bound_at"),
)
Index("ix_wl_bindings_order", wl_bindings.c.order_id)

wl_complete_studies = Table(
    "wl_complete_studies",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    _ts("completed_at"),
)

wl_reconciliation = Table(
    "wl_reconciliation",
    metadata,
    Column("item_id", String(32), primary_key=True),
    _s("study_instance_uid"),
    _s("status", 16),
    Column("reason", Text, nullable=False, default=""),
    _s("patient_id"),
    _s("issuer_of_patient_id"),
    _s("accession_number", 16),
    _s("order_id", 32),
    _s("resolved_by", 128),
    Column("note", Text, nullable=False, default=""),
    _ts("created_at"),
    _ts("resolved_at", nullable=True),
)
Index("ix_wl_reconciliation_study", wl_reconciliation.c.study_instance_uid)
Index("ix_wl_reconciliation_status", wl_reconciliation.c.status)

wl_merges = Table(
    "wl_merges",
    metadata,
    Column("merge_id", String(32), primary_key=True),
    _s("prior_patient_id"),
    _s("prior_issuer_of_patient_id"),
    _s("patient_id"),
    _s("issuer_of_patient_id"),
    Column("moved_order_ids", Text, nullable=False, default="[]"),
    _s("index_merge_ref", 128),
    _ts("merged_at"),
    _ts("undone_at", nullable=True),
)

TABLES = [wl_messages, wl_patients, wl_orders, wl_mpps, wl_bindings, wl_complete_studies,
          wl_reconciliation, wl_merges]
