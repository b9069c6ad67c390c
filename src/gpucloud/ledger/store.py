"""What every ledger aggregate shares: the engine, the clock, the read transaction, and
the few lookups all of them make (an account by name, names by id, an audit record).

Each aggregate (accounts.py, entries.py, usage.py, meters.py, accrual.py, orders.py,
vouchers.py, audit.py, wipes.py, image_copies.py, model_billing.py) holds one Store;
the Ledger facade (ledger.py) builds one Store and hands it to all of them. The
transaction rules are written once, in ledger.py's docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, Engine, Row, insert, select

from gpucloud.clock import Clock, SystemClock
from gpucloud.ledger import db, schema
from gpucloud.ledger.errors import NotFound

A, AU = schema.accounts, schema.audit


class Store:
    """The engine and clock of one Ledger, and the helpers its aggregates share."""

    def __init__(self, engine: Engine, clock: Clock | None = None) -> None:
        self.engine = engine
        self.clock: Clock = clock or SystemClock()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction: one consistent snapshot, and on SQLite a deferred
        BEGIN so readers do not queue behind writers for the write lock."""
        with self.engine.connect() as conn:
            conn.execution_options(**{db.READ_ONLY: True})
            if self.dialect == "postgresql":  # one snapshot for the whole read
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def row(
        self, conn: Connection, key: Column[Any], value: Any, what: str, *, lock: bool = False
    ) -> Row[Any]:
        """The row whose unique ``key`` column is ``value``, NotFound (naming it ``what``)
        if none; ``lock``: SELECT ... FOR UPDATE, the row's lock held to the end of the
        transaction."""
        query = select(key.table).where(key == value)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"{what} {value!r} does not exist")
        return row

    def account_row(self, conn: Connection, name: str, *, lock: bool = False) -> Row[Any]:
        """The account's row (``lock``: its row lock), NotFound if none."""
        return self.row(conn, A.c.name, name, "account", lock=lock)

    def names(self, conn: Connection, ids: set[int]) -> dict[int, str]:
        """Account names by id."""
        if not ids:
            return {}
        rows = conn.execute(select(A.c.id, A.c.name).where(A.c.id.in_(ids))).all()
        return {i: n for i, n in rows}

    def audit(
        self,
        conn: Connection,
        account_id: int | None,
        actor: str,
        action: str,
        subject: str,
        detail: dict[str, Any],
        at: datetime | None = None,
    ) -> None:
        """Append one audit record inside the caller's transaction (so a state change
        and its record commit together, or neither does)."""
        conn.execute(
            insert(AU).values(
                account_id=account_id,
                at=at or self.clock.now(),
                actor=actor,
                action=action,
                subject=subject,
                detail=detail,
            )
        )
