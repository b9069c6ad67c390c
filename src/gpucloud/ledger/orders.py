"""Online payment orders: a pending order, credited exactly once when paid.

``settle_order`` posts the recharge with key ``order:{order_id}`` and marks the order
paid in one transaction, under the order's and the account's row locks; a provider
transaction settles one order only. Refusals are committed to the audit trail before
OrderRefused is raised.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.entries import Entries
from gpucloud.ledger.errors import IdempotencyConflict, OrderRefused
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import EntryKind, Order, OrderStatus

A, ORD = schema.accounts, schema.orders


def order_of(row: Row[Any], account: str) -> Order:
    return Order(
        order_id=row.order_id,
        account=account,
        amount_minor=row.amount_minor,
        provider=row.provider,
        status=OrderStatus(row.status),
        created_at=row.created_at,
        expires_at=row.expires_at,
        provider_txn=row.provider_txn,
        paid_at=row.paid_at,
        entry_id=row.entry_id,
        client_ref=row.client_ref,
    )


class Orders:
    """Creating, settling and expiring online payment orders."""

    def __init__(self, store: Store, entries: Entries) -> None:
        self._s = store
        self._entries = entries

    def create_order(
        self,
        account: str,
        amount_minor: int,
        provider: str,
        expires_at: datetime,
        client_ref: str | None = None,
        *,
        actor: str | None = None,
    ) -> Order:
        """A pending online payment order. Its ``order_id``, what the payment provider is
        given, is always the ledger's own (a tenant cannot take another's). The request
        is idempotent per account on ``client_ref`` if given: the same terms again return
        the order, other terms raise IdempotencyConflict (another account's equal
        ``client_ref`` is another order). ``actor``: who asked, for the audit trail."""
        amount = v.positive(amount_minor, "amount_minor")
        v.text(provider, "provider", max_len=64)
        v.instant(expires_at, "expires_at")
        if client_ref is not None:
            v.text(client_ref, "client_ref", max_len=64)
        actor = v.text(actor, "actor") if actor is not None else f"user:{account}"
        order_id = uuid.uuid4().hex
        now = self._s.clock.now()
        with self._s.engine.begin() as conn:
            acct = self._s.account_row(conn, account, lock=True)
            if client_ref is not None:
                row = conn.execute(
                    select(ORD).where(ORD.c.account_id == acct.id, ORD.c.client_ref == client_ref)
                ).first()
                if row is not None:
                    if (row.amount_minor, row.provider) != (amount, provider):
                        raise IdempotencyConflict(
                            f"order:{client_ref}", "order exists with other terms"
                        )
                    return order_of(row, account)
            conn.execute(
                insert(ORD).values(
                    order_id=order_id,
                    account_id=acct.id,
                    amount_minor=amount,
                    provider=provider,
                    status=OrderStatus.PENDING.value,
                    created_at=now,
                    expires_at=expires_at,
                    client_ref=client_ref,
                )
            )
            detail = {"amount_minor": amount, "provider": provider, "client_ref": client_ref}
            self._s.audit(conn, acct.id, actor, "order.created", order_id, detail, now)
            row = conn.execute(select(ORD).where(ORD.c.order_id == order_id)).one()
        return order_of(row, account)

    def find_order(self, account: str, client_ref: str) -> Order | None:
        """The account's order with this client reference, if any."""
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            row = conn.execute(
                select(ORD).where(ORD.c.account_id == acct.id, ORD.c.client_ref == client_ref)
            ).first()
        return None if row is None else order_of(row, account)

    def orders(self, account: str, *, newest: int = 20) -> list[Order]:
        """The account's ``newest`` orders, the most recently created first."""
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            rows = conn.execute(
                select(ORD)
                .where(ORD.c.account_id == acct.id)
                .order_by(ORD.c.created_at.desc(), ORD.c.order_id.desc())
                .limit(v.positive(newest, "newest"))
            ).all()
        return [order_of(r, account) for r in rows]

    def get_order(self, order_id: str) -> Order:
        with self._s.read() as conn:
            row = self._order_row(conn, order_id)
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return order_of(row, name)

    def _order_row(self, conn: Connection, order_id: str, *, lock: bool = False) -> Row[Any]:
        return self._s.row(conn, ORD.c.order_id, order_id, "order", lock=lock)

    def settle_order(
        self, order_id: str, provider_txn: str, amount_minor: int, at: datetime
    ) -> Order:
        """Credit a paid order exactly once (key ``order:{order_id}``). A replay with the
        same provider_txn and amount returns the paid order; OrderRefused for an expired
        order (``at`` after expires_at, or expired by expire_orders), an amount mismatch,
        a different provider_txn for an already paid order, or a provider_txn already
        used for another order. Refusals are written to the audit trail too."""
        v.text(provider_txn, "provider_txn", max_len=128)
        amount = v.integer(amount_minor, "amount_minor")
        v.instant(at, "at")
        refusal: OrderRefused | None = None
        with self._s.engine.begin() as conn:
            row = self._order_row(conn, order_id, lock=True)
            acct = conn.execute(select(A).where(A.c.id == row.account_id).with_for_update()).one()
            actor = f"provider:{row.provider}"
            if row.status == OrderStatus.PAID.value:
                if row.provider_txn == provider_txn and row.amount_minor == amount:
                    return order_of(row, acct.name)
                refusal = OrderRefused(
                    order_id,
                    "already_settled",
                    f"paid by transaction {row.provider_txn!r}, not {provider_txn!r}"
                    if row.provider_txn != provider_txn
                    else f"paid {row.amount_minor}, not {amount}",
                )
            elif row.status == OrderStatus.EXPIRED.value or at > row.expires_at:
                refusal = OrderRefused(
                    order_id,
                    "expired",
                    f"expired at {row.expires_at.isoformat()}, paid at "
                    f"{at.isoformat()}; refund the payment through the provider",
                )
            elif amount != row.amount_minor:
                refusal = OrderRefused(
                    order_id, "amount_mismatch", f"order is for {row.amount_minor}, paid {amount}"
                )
            else:
                reused = conn.execute(
                    select(ORD.c.order_id).where(
                        ORD.c.provider == row.provider, ORD.c.provider_txn == provider_txn
                    )
                ).first()
                if reused is not None:
                    refusal = OrderRefused(
                        order_id,
                        "txn_reused",
                        f"transaction {provider_txn!r} already settled order {reused[0]!r}",
                    )
            if refusal is not None:
                detail = {"reason": refusal.reason, "provider_txn": provider_txn, "amount": amount}
                self._s.audit(conn, acct.id, actor, "order.refused", order_id, detail, at)
            else:
                entry, _, _ = self._entries.post(
                    conn,
                    acct,
                    EntryKind.RECHARGE,
                    amount,
                    f"order:{order_id}",
                    None,
                    f"online recharge via {row.provider}",
                    at,
                    {"order_id": order_id, "provider_txn": provider_txn},
                )
                conn.execute(
                    update(ORD)
                    .where(ORD.c.order_id == order_id)
                    .values(
                        status=OrderStatus.PAID.value,
                        provider_txn=provider_txn,
                        paid_at=at,
                        entry_id=entry.id,
                    )
                )
                detail = {"provider_txn": provider_txn, "amount_minor": amount}
                self._s.audit(conn, acct.id, actor, "order.paid", order_id, detail, at)
                row = self._order_row(conn, order_id)
        if refusal is not None:
            raise refusal  # after the commit, so the refusal stays in the audit trail
        return order_of(row, acct.name)

    def expire_orders(self, now: datetime) -> list[str]:
        """Mark pending orders whose expires_at <= now expired; returns their ids."""
        v.instant(now, "now")
        with self._s.engine.begin() as conn:
            rows = conn.execute(
                select(ORD.c.order_id, ORD.c.account_id)
                .where(ORD.c.status == OrderStatus.PENDING.value, ORD.c.expires_at <= now)
                .with_for_update()
            ).all()
            for order_id, account_id in rows:
                conn.execute(
                    update(ORD)
                    .where(ORD.c.order_id == order_id, ORD.c.status == OrderStatus.PENDING.value)
                    .values(status=OrderStatus.EXPIRED.value)
                )
                self._s.audit(conn, account_id, "system", "order.expired", order_id, {}, now)
        return [r.order_id for r in rows]
