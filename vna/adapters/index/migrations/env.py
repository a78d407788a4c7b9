"""Alembic environment: runs on the connection VNA hands it (see sqlalchemy.migrate)."""

from __future__ import annotations

from alembic import context

from vna.adapters.index.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("VNA runs its migrations through vna.adapters.index.sqlalchemy.migrate")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
