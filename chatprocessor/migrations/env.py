"""Alembic environment: runs on the connection chatprocessor.stores.database.migrate hands
over (``chatprocessor db upgrade``), inside its transaction and lock."""

from __future__ import annotations

from alembic import context

import chatprocessor.stores.usage_ledger  # noqa: F401  (adds ai_usage_logs to the metadata)
from chatprocessor.stores.job_metrics import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `chatprocessor db upgrade` (it connects to DATABASE_URL)"
    )
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
