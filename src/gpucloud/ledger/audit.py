"""The audit trail: who did what when, read back and recorded by hand.

Aggregates append their records with ``Store.audit`` inside their own transactions (so a
state change and its record commit together); ``record_audit`` records a fact without
money from outside (e.g. the operator deleting an account's data after arrears).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import AuditEvent

AU = schema.audit


class AuditTrail:
    def __init__(self, store: Store) -> None:
        self._s = store

    def record_audit(
        self,
        account: str,
        actor: str,
        action: str,
        subject: str,
        detail: dict[str, Any],
        at: datetime,
    ) -> None:
        """Append one record to the audit trail (e.g. the operator deleting an account's
        data after arrears): a fact without money, so not an entry."""
        v.text(action, "action")
        v.text(subject, "subject")
        v.instant(at, "at")
        with self._s.engine.begin() as conn:
            acct = self._s.account_row(conn, account)
            self._s.audit(conn, acct.id, actor, action, subject, dict(detail), at)

    def audit_events(self, account: str | None = None, *, limit: int = 1000) -> list[AuditEvent]:
        """Who did what when (orders, vouchers, manual entries), oldest first."""
        with self._s.read() as conn:
            query = select(AU).order_by(AU.c.id).limit(limit)
            if account is not None:
                query = query.where(AU.c.account_id == self._s.account_row(conn, account).id)
            rows = conn.execute(query).all()
            names = self._s.names(conn, {r.account_id for r in rows if r.account_id is not None})
        return [
            AuditEvent(
                r.id,
                names.get(r.account_id) if r.account_id is not None else None,
                r.at,
                r.actor,
                r.action,
                r.subject,
                dict(r.detail or {}),
            )
            for r in rows
        ]
