"""What each GPU did in a gpu_time window (UsageRecord.activity): the busiest sampled
second's utilization and memory, and how many seconds were sampled, for idle-GPU
detection (docs/idle.md); and an index to read a meter's records by time.

Revision ID: 0008_gpu_activity
Revises: 0007_entries_by_time
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_gpu_activity"
down_revision = "0007_entries_by_time"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns: an ALTER TABLE ADD COLUMN on both databases, no table rebuild
    op.add_column("ledger_usage", sa.Column("util_max", sa.Integer(), nullable=True))
    op.add_column("ledger_usage", sa.Column("memory_max", sa.BigInteger(), nullable=True))
    op.add_column("ledger_usage", sa.Column("samples", sa.Integer(), nullable=True))
    op.create_index("ix_ledger_usage_meter_end", "ledger_usage", ["meter_id", "end_s"])


def downgrade() -> None:
    op.drop_index("ix_ledger_usage_meter_end", "ledger_usage")
    with op.batch_alter_table("ledger_usage") as batch:
        batch.drop_column("samples")
        batch.drop_column("memory_max")
        batch.drop_column("util_max")
