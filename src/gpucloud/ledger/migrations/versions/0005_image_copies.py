"""Image copies: an Image's data is copied by the agent of the node that holds its
source instance's folder; the operator requests, the agent reports the bytes used.

Revision ID: 0005_image_copies
Revises: 0004_trust_boundaries
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_image_copies"
down_revision = "0004_trust_boundaries"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_image_copies",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("requested_at", sa.BigInteger, nullable=False),
        sa.Column("done_at", sa.BigInteger),
        sa.Column("outcome", sa.String(16)),
        sa.Column("bytes_used", sa.BigInteger),
        sa.Column("message", sa.String(1024)),
        sa.UniqueConstraint("subject", name="uq_ledger_image_copies_subject"),
    )
    op.create_index("ix_ledger_image_copies_node", "ledger_image_copies", ["node", "done_at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_image_copies_node", "ledger_image_copies")
    op.drop_table("ledger_image_copies")
