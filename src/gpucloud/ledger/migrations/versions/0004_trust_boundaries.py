"""Trust boundaries (issue 16): what a meter was opened for, per-account order and
transfer ids, the real submitter of a voucher.

* ``ledger_meters.node``, ``gpu_uuids``, ``max_bytes``: usage is charged only when it
  comes from the meter's node, names one of the GPUs bound to it (at most ``gpus``), and
  a volume's bytes are within its capacity.
* ``ledger_orders.client_ref``: a client's idempotency key, unique per account (the
  global ``order_id`` is always chosen by the ledger). Existing orders keep their id as
  their key.
* ``ledger_vouchers``: (bank, transfer number) unique per account, not across accounts;
  ``submitter`` is who submitted it.

Revision ID: 0004_trust_boundaries
Revises: 0003_node_wipes
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_trust_boundaries"
down_revision = "0003_node_wipes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_meters") as batch:
        batch.add_column(sa.Column("node", sa.String(253)))
        batch.add_column(sa.Column("gpu_uuids", sa.Text))
        batch.add_column(sa.Column("max_bytes", sa.BigInteger))
    with op.batch_alter_table("ledger_orders") as batch:
        batch.add_column(sa.Column("client_ref", sa.String(64)))
    orders = sa.table(
        "ledger_orders", sa.column("order_id", sa.String), sa.column("client_ref", sa.String)
    )
    op.get_bind().execute(sa.update(orders).values(client_ref=orders.c.order_id))
    with op.batch_alter_table("ledger_orders") as batch:
        batch.create_unique_constraint("uq_ledger_orders_client_ref", ["account_id", "client_ref"])
    with op.batch_alter_table("ledger_vouchers") as batch:
        batch.add_column(sa.Column("submitter", sa.String(253)))
        batch.drop_constraint("uq_ledger_vouchers_transfer", type_="unique")
        batch.create_unique_constraint(
            "uq_ledger_vouchers_transfer", ["account_id", "bank", "transfer_no"]
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger_vouchers") as batch:
        batch.drop_constraint("uq_ledger_vouchers_transfer", type_="unique")
        batch.create_unique_constraint("uq_ledger_vouchers_transfer", ["bank", "transfer_no"])
        batch.drop_column("submitter")
    with op.batch_alter_table("ledger_orders") as batch:
        batch.drop_constraint("uq_ledger_orders_client_ref", type_="unique")
        batch.drop_column("client_ref")
    with op.batch_alter_table("ledger_meters") as batch:
        for name in ("max_bytes", "gpu_uuids", "node"):
            batch.drop_column(name)
