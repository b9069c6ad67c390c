"""Meter settlement: a closed meter can be finalized (settle_meter) so that usage
arriving after it is stored and counted as late, never charged a second time.

Meters whose run an earlier operator already billed from control-plane timestamps (an
entry ``meter-fallback:<meter>``) are marked settled here, with that entry folded into
``posted_minor``, so late usage of those runs is not rated either.

Revision ID: 0002_meter_settlement
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_meter_settlement"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("settled_at", "fallback_quantity", "fallback_minor", "late_quantity", "late_records")
_PREFIX = "meter-fallback:"


def upgrade() -> None:
    op.add_column("ledger_meters", sa.Column("settled_at", sa.BigInteger))
    for name in ("fallback_quantity", "fallback_minor", "late_records"):
        op.add_column(
            "ledger_meters", sa.Column(name, sa.BigInteger, nullable=False, server_default="0")
        )
    op.add_column(
        "ledger_meters", sa.Column("late_quantity", sa.Text, nullable=False, server_default="0")
    )
    _adopt_fallback_entries()


def _adopt_fallback_entries() -> None:
    """Settle the meters an earlier operator billed with a fallback entry (in the same
    transaction as the new columns: the migration is all or nothing)."""
    entries = sa.table(
        "ledger_entries",
        sa.column("key", sa.String),
        sa.column("amount_minor", sa.BigInteger),
        sa.column("at", sa.BigInteger),
        sa.column("meta", sa.JSON),
    )
    meters = sa.table(
        "ledger_meters",
        sa.column("meter_id", sa.String),
        sa.column("posted_minor", sa.BigInteger),
        sa.column("settled_at", sa.BigInteger),
        sa.column("fallback_quantity", sa.BigInteger),
        sa.column("fallback_minor", sa.BigInteger),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(entries.c.key, entries.c.amount_minor, entries.c.at, entries.c.meta).where(
            entries.c.key.like(_PREFIX + "%")
        )
    ).all()
    for key, amount, at, meta in rows:
        charged = -int(amount)
        conn.execute(
            sa.update(meters)
            .where(meters.c.meter_id == key[len(_PREFIX) :], meters.c.settled_at.is_(None))
            .values(
                settled_at=at,
                posted_minor=meters.c.posted_minor + charged,
                fallback_minor=charged,
                fallback_quantity=int((meta or {}).get("gpu_seconds", 0)),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger_meters") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
