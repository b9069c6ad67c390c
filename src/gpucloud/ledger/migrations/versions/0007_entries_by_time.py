"""An index of each account's entries by time: a month's spending (budgets) reads a
range of ``at`` instead of every entry of the account.

Revision ID: 0007_entries_by_time
Revises: 0006_model_billing
Create Date: 2026-12-10
"""

from __future__ import annotations

from alembic import op

revision = "0007_entries_by_time"
down_revision = "0006_model_billing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_entries_account_at", "ledger_entries", ["account_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_entries_account_at", "ledger_entries")
