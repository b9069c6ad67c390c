"""Accounts and their balances.

An account's balance is cached on its row and changed only by posting an entry
(entries.py), under the account's row lock, in the transaction that inserts the entry.
"""

from __future__ import annotations

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from gpucloud.billing.money import minor_exponent
from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.errors import InvalidInput
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import Account

A = schema.accounts


class Accounts:
    def __init__(self, store: Store) -> None:
        self._s = store

    def ensure_account(self, name: str, currency: str = "CNY") -> Account:
        """Create the account if missing (idempotent); a different currency for an
        existing account raises InvalidInput."""
        v.text(name, "name")
        v.text(currency, "currency", max_len=8)
        try:
            minor_exponent(currency)
        except ValueError as exc:
            raise InvalidInput(f"currency: {exc}") from None
        row = None
        for _ in range(3):
            try:
                with self._s.engine.begin() as conn:
                    row = conn.execute(select(A).where(A.c.name == name)).first()
                    if row is None:
                        conn.execute(
                            insert(A).values(
                                name=name,
                                currency=currency,
                                balance_minor=0,
                                created_at=self._s.clock.now(),
                            )
                        )
                        row = self._s.account_row(conn, name)
                break
            except IntegrityError:  # created concurrently: read it on the next turn
                continue
        if row is None:
            with self._s.read() as conn:
                row = self._s.account_row(conn, name)
        if row.currency != currency:
            raise InvalidInput(
                f"currency: account {name!r} already exists in {row.currency}, not {currency}"
            )
        return Account(row.name, row.currency, row.balance_minor, row.created_at)

    def get_account(self, name: str) -> Account:
        """The account, or NotFound."""
        with self._s.read() as conn:
            row = self._s.account_row(conn, name)
        return Account(row.name, row.currency, row.balance_minor, row.created_at)

    def accounts(self) -> list[Account]:
        """All accounts, by name."""
        with self._s.read() as conn:
            rows = conn.execute(select(A).order_by(A.c.name)).all()
        return [Account(r.name, r.currency, r.balance_minor, r.created_at) for r in rows]

    def balance(self, account: str) -> int:
        """The account balance in minor units: exactly the sum of its entries."""
        with self._s.read() as conn:
            return int(self._s.account_row(conn, account).balance_minor)
