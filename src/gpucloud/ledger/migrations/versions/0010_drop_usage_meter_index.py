"""Drop ``ix_ledger_usage_meter`` (meter_id): ``ix_ledger_usage_meter_end`` (meter_id,
end_s, from 0008) answers every lookup by meter too, and each index is one more b-tree
write per usage row on the hot path of ingestion.

Revision ID: 0010_drop_usage_meter_index
Revises: 0009_meter_gpu_product
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0010_drop_usage_meter_index"
down_revision = "0009_meter_gpu_product"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_ledger_usage_meter", "ledger_usage")


def downgrade() -> None:
    op.create_index("ix_ledger_usage_meter", "ledger_usage", ["meter_id"])
