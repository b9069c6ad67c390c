"""The GPU product a GPU meter was opened for (a whole GPU, a MIG profile, a time-sliced
share): usage of another product or another kind of device is not charged to it
(gpucloud.ledger.admission). NULL on meters opened before: no product check.

Revision ID: 0009_meter_gpu_product
Revises: 0008_gpu_activity
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_meter_gpu_product"
down_revision = "0008_gpu_activity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ledger_meters", sa.Column("gpu_product", sa.String(253)))


def downgrade() -> None:
    with op.batch_alter_table("ledger_meters") as batch:
        batch.drop_column("gpu_product")
