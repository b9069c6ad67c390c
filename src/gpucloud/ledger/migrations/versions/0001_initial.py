"""The initial ledger schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(253), nullable=False, unique=True),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("balance_minor", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("key", sa.String(255), nullable=False, unique=True),
        sa.Column("resource", sa.String(253)),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_ledger_entries_account", "ledger_entries", ["account_id", "id"])
    op.create_index(
        "ix_ledger_entries_account_resource", "ledger_entries", ["account_id", "resource", "id"]
    )
    op.create_table(
        "ledger_usage",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("subject", sa.String(253), nullable=False),
        sa.Column("start_s", sa.BigInteger, nullable=False),
        sa.Column("end_s", sa.BigInteger, nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.Column("measure", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(253), nullable=False),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("namespace", sa.String(253)),
        sa.Column("pod_name", sa.String(253)),
        sa.Column("gpu_product", sa.String(253)),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("rated_until", sa.BigInteger, nullable=False),
        sa.Column("meter_id", sa.String(253)),
        sa.Column("rated_at", sa.BigInteger),
        sa.UniqueConstraint("kind", "subject", "start_s", name="uq_ledger_usage_natural_key"),
    )
    op.create_index(
        "ix_ledger_usage_unrated",
        "ledger_usage",
        ["kind", "owner", "start_s"],
        sqlite_where=sa.text("rated_until < end_s"),
        postgresql_where=sa.text("rated_until < end_s"),
    )
    op.create_index("ix_ledger_usage_meter", "ledger_usage", ["meter_id"])
    op.create_table(
        "ledger_meters",
        sa.Column("meter_id", sa.String(253), primary_key=True),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("resource", sa.String(253), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("subject", sa.String(253), nullable=False),
        sa.Column("unit_price", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("opened_at", sa.BigInteger, nullable=False),
        sa.Column("closed_at", sa.BigInteger),
        sa.Column("memo", sa.Text, nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("quantity_rated", sa.Text, nullable=False),
        sa.Column("posted_minor", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("last_usage_end", sa.BigInteger),
    )
    op.create_index("ix_ledger_meters_subject", "ledger_meters", ["kind", "subject"])
    op.create_index("ix_ledger_meters_account", "ledger_meters", ["account_id"])
    op.create_table(
        "ledger_orders",
        sa.Column("order_id", sa.String(64), primary_key=True),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("provider_txn", sa.String(128)),
        sa.Column("paid_at", sa.BigInteger),
        sa.Column("entry_id", ID),
        sa.UniqueConstraint("provider", "provider_txn", name="uq_ledger_orders_txn"),
    )
    op.create_index("ix_ledger_orders_status", "ledger_orders", ["status", "expires_at"])
    op.create_table(
        "ledger_vouchers",
        sa.Column("voucher_id", sa.String(64), primary_key=True),
        sa.Column("account_id", ID, sa.ForeignKey("ledger_accounts.id"), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("payer", sa.String(253), nullable=False),
        sa.Column("bank", sa.String(253), nullable=False),
        sa.Column("transfer_no", sa.String(128), nullable=False),
        sa.Column("file_sha256", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("submitted_at", sa.BigInteger, nullable=False),
        sa.Column("reviewer", sa.String(253)),
        sa.Column("reason", sa.Text),
        sa.Column("reviewed_at", sa.BigInteger),
        sa.Column("entry_id", ID),
        sa.UniqueConstraint("bank", "transfer_no", name="uq_ledger_vouchers_transfer"),
    )
    op.create_index("ix_ledger_vouchers_status", "ledger_vouchers", ["status"])
    op.create_table(
        "ledger_audit",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", ID),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(253), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_ledger_audit_account", "ledger_audit", ["account_id", "id"])
    _append_only("ledger_entries")
    _append_only("ledger_audit")


def _append_only(table: str) -> None:
    """Refuse UPDATE and DELETE of rows in the database itself: money entries and the
    audit trail are append-only even for code that bypasses the Ledger API."""
    message = f"{table} is append-only: post a correcting entry instead"
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("ledger_entries", "ledger_audit"):
            op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
            op.execute(f"DROP FUNCTION {table}_append_only()")
    for table in (
        "ledger_audit",
        "ledger_vouchers",
        "ledger_orders",
        "ledger_meters",
        "ledger_usage",
        "ledger_entries",
        "ledger_accounts",
    ):
        op.drop_table(table)
