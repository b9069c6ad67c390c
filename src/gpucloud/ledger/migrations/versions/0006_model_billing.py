"""Model billing in the ledger: request usage (with each (payer, model) meter's exact
cumulative total) and replica online intervals, formerly a separate SQLite file.

Revision ID: 0006_model_billing
Revises: 0005_image_copies
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_model_billing"
down_revision = "0005_image_copies"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_model_requests",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(253), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("runtime_ms", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("images", sa.BigInteger, nullable=False),
        sa.Column("videos", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.String(80)),
        sa.Column("cumulative", sa.String(80)),
        sa.UniqueConstraint("model", "request_id", name="uq_ledger_model_requests_request"),
    )
    op.create_index(
        "ix_ledger_model_requests_meter", "ledger_model_requests", ["account_id", "model", "id"]
    )
    op.create_index("ix_ledger_model_requests_source", "ledger_model_requests", ["source", "at"])
    op.create_table(
        "ledger_model_replicas",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(253), nullable=False),
        sa.Column("replica", sa.String(253), nullable=False),
        sa.Column("start_at", sa.BigInteger, nullable=False),
        sa.Column("end_at", sa.BigInteger),
        sa.UniqueConstraint(
            "model", "replica", "start_at", name="uq_ledger_model_replicas_interval"
        ),
    )


def downgrade() -> None:
    op.drop_table("ledger_model_replicas")
    op.drop_index("ix_ledger_model_requests_source", "ledger_model_requests")
    op.drop_index("ix_ledger_model_requests_meter", "ledger_model_requests")
    op.drop_table("ledger_model_requests")
