"""Node wipes: folders on a node's local disk that the node's agent must remove (an
instance volume deleted after 7 days of arrears); the operator requests, the agent
reports the bytes freed.

Revision ID: 0003_node_wipes
Revises: 0002_meter_settlement
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_node_wipes"
down_revision = "0002_meter_settlement"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_node_wipes",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("requested_at", sa.BigInteger, nullable=False),
        sa.Column("done_at", sa.BigInteger),
        sa.Column("bytes_freed", sa.BigInteger),
        sa.UniqueConstraint("subject", name="uq_ledger_node_wipes_subject"),
    )
    op.create_index("ix_ledger_node_wipes_node", "ledger_node_wipes", ["node", "done_at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_node_wipes_node", "ledger_node_wipes")
    op.drop_table("ledger_node_wipes")
