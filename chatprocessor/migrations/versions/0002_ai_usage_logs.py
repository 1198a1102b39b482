"""ai_usage_logs: the usage ledger, one row per job with its tokens and cost (seed 004).

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ai_usage_logs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(200), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("job_type", sa.String(64), nullable=True),
        sa.Column("lane", sa.String(16), nullable=True),
        sa.Column("input_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("total_cost", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("currency", sa.String(8), nullable=True),
        sa.Column("cache_hit", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ai_usage_logs"),
        sa.UniqueConstraint("job_id", name="uq_ai_usage_logs_job_id"),
    )
    op.create_index(
        "ix_ai_usage_logs_tenant_id_timestamp", "ai_usage_logs", ["tenant_id", "timestamp"]
    )


def downgrade() -> None:
    op.drop_index("ix_ai_usage_logs_tenant_id_timestamp", table_name="ai_usage_logs")
    op.drop_table("ai_usage_logs")
