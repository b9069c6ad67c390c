"""Entries and posting: the only code that changes a balance.

``Entries.post`` is the posting primitive every aggregate uses (meter charges,
settlement fallbacks, order and voucher recharges, manual entries): inside the caller's
transaction, with the account's row lock already held, it looks the idempotency key up,
returns the stored entry for a replay of the same content (IdempotencyConflict for other
content), or inserts the entry with its ``balance_after`` and sets the account's cached
balance. Entries are append-only (database triggers refuse UPDATE and DELETE).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.errors import IdempotencyConflict, InvalidInput, NotFound
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import Entry, EntryKind, PostResult

A, E = schema.accounts, schema.entries
BATCH = 500  # items per IN list of the batch reads (well under SQLite's variable limit)

# Statements of the metering hot path, built once: building a statement costs more than
# running it (compiled forms are cached by SQLAlchemy either way).
ENTRY_BY_KEY = select(E).where(E.c.key == bindparam("key"))
LOCK_ACCOUNT = select(A).where(A.c.id == bindparam("acct_id")).with_for_update()
_INSERT_ENTRY = insert(E).returning(E.c.id)
# the batch read of ``charges_by_resources``: IN lists as expanding parameters, so the
# statement is built and compiled once, whatever the lists' lengths
_CHARGES_OF = (
    select(A.c.name, E.c.resource, func.sum(E.c.amount_minor))
    .join(A, A.c.id == E.c.account_id)
    .where(
        A.c.name.in_(bindparam("names", expanding=True)),
        E.c.resource.in_(bindparam("resources", expanding=True)),
        E.c.kind == bindparam("kind"),
    )
    .group_by(A.c.name, E.c.resource)
)
_SET_BALANCE = update(A).where(A.c.id == bindparam("acct_id")).values(balance_minor=bindparam("b"))


def entry_of(row: Row[Any], account: str) -> Entry:
    return Entry(
        id=row.id,
        account=account,
        kind=EntryKind(row.kind),
        amount_minor=row.amount_minor,
        key=row.key,
        resource=row.resource,
        memo=row.memo,
        at=row.at,
        meta=dict(row.meta or {}),
        balance_after=row.balance_after,
    )


def check_sign(kind: EntryKind, amount: int) -> None:
    ok = {
        EntryKind.RECHARGE: amount > 0,
        EntryKind.REFUND: amount > 0,
        EntryKind.CHARGE: amount < 0,
        EntryKind.ADJUSTMENT: amount != 0,
    }[kind]
    if not ok:
        rule = {
            EntryKind.RECHARGE: "> 0",
            EntryKind.REFUND: "> 0",
            EntryKind.CHARGE: "< 0",
            EntryKind.ADJUSTMENT: "!= 0",
        }[kind]
        raise InvalidInput(f"amount_minor: a {kind.value} entry must be {rule}, got {amount}")


class Entries:
    """Posting (with idempotency keys) and reading entries."""

    def __init__(self, store: Store) -> None:
        self._s = store

    def post(
        self,
        conn: Connection,
        acct: Row[Any],
        kind: EntryKind,
        amount: int,
        key: str,
        resource: str | None,
        memo: str,
        at: datetime,
        meta: dict[str, Any],
    ) -> tuple[Entry, bool, int]:
        """Insert one entry under the account's row lock (already held); returns the
        entry, whether it was created, and the account's new balance."""
        existing = conn.execute(ENTRY_BY_KEY, {"key": key}).first()
        if existing is not None:
            self.same_entry(conn, existing, acct.id, kind, amount, resource, key)
            return entry_of(existing, acct.name), False, acct.balance_minor
        new_balance = acct.balance_minor + amount
        entry_id = conn.execute(
            _INSERT_ENTRY,
            {
                "account_id": acct.id,
                "kind": kind.value,
                "amount_minor": amount,
                "key": key,
                "resource": resource,
                "memo": memo,
                "at": at,
                "meta": meta,
                "balance_after": new_balance,
                "recorded_at": self._s.clock.now(),
            },
        ).scalar_one()
        conn.execute(_SET_BALANCE, {"acct_id": acct.id, "b": new_balance})
        entry = Entry(entry_id, acct.name, kind, amount, key, resource, memo, at, meta, new_balance)
        return entry, True, new_balance

    def same_entry(
        self,
        conn: Connection,
        row: Row[Any],
        account_id: int,
        kind: EntryKind,
        amount: int,
        resource: str | None,
        key: str,
    ) -> None:
        diffs = []
        if row.account_id != account_id:
            diffs.append("account")
        if row.kind != kind.value:
            diffs.append(f"kind {row.kind} != {kind.value}")
        if row.amount_minor != amount:
            diffs.append(f"amount_minor {row.amount_minor} != {amount}")
        if row.resource != resource:
            diffs.append(f"resource {row.resource!r} != {resource!r}")
        if diffs:
            raise IdempotencyConflict(key, "; ".join(diffs))

    def post_entry(
        self,
        account: str,
        kind: EntryKind | str,
        amount_minor: int,
        key: str,
        *,
        resource: str | None = None,
        memo: str = "",
        at: datetime,
        meta: dict[str, Any] | None = None,
    ) -> PostResult:
        """Append one entry. Signs: recharge/refund > 0, charge < 0, adjustment != 0.

        ``key`` is the idempotency key: re-posting it with the same account, kind,
        amount and resource returns the stored entry with ``created=False``; with other
        content it raises IdempotencyConflict naming the key. (``memo``, ``at`` and
        ``meta`` of a replay are ignored: a retried call may carry a later timestamp.)
        Manual entries (not meter charges) are also written to the audit trail, with
        ``meta["actor"]`` as the actor when given.
        """
        kind = v.choice(kind, EntryKind, "kind")
        amount = v.integer(amount_minor, "amount_minor")
        check_sign(kind, amount)
        v.text(key, "key", max_len=255)
        if resource is not None:
            v.text(resource, "resource")
        v.text(memo, "memo", max_len=4000, empty=True)
        v.instant(at, "at")
        meta = dict(meta or {})
        try:
            with self._s.engine.begin() as conn:
                acct = self._s.account_row(conn, account, lock=True)
                entry, created, _ = self.post(
                    conn, acct, kind, amount, key, resource, memo, at, meta
                )
                if created:
                    actor = str(meta.get("actor", "system"))
                    detail = {"kind": kind.value, "amount_minor": amount, "memo": memo}
                    self._s.audit(conn, acct.id, actor, "entry.posted", key, detail, at)
        except IntegrityError:
            # The same key was inserted concurrently (for another account, whose row lock
            # we did not hold): it exists now, so this is a replay or a conflict.
            with self._s.engine.begin() as conn:
                acct = self._s.account_row(conn, account)
                row = conn.execute(select(E).where(E.c.key == key)).first()
                if row is None:
                    raise
                self.same_entry(conn, row, acct.id, kind, amount, resource, key)
                return PostResult(entry_of(row, account), False)
        return PostResult(entry, created)

    def entries_sum(self, account: str) -> int:
        """The sum of the account's entries computed from the entries themselves (for
        audits and tests of the cached balance)."""
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            total = conn.execute(
                select(func.coalesce(func.sum(E.c.amount_minor), 0)).where(
                    E.c.account_id == acct.id
                )
            ).scalar_one()
        return int(total)

    def entries(
        self,
        account: str,
        *,
        resource: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Entry]:
        """Entries oldest first (page with ``after_id`` = the last id seen), each with
        ``balance_after``, the account's running balance right after that entry."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit: must be an int in 1..10000, got {limit!r}")
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            query = select(E).where(E.c.account_id == acct.id)
            if resource is not None:
                query = query.where(E.c.resource == resource)
            if after_id is not None:
                query = query.where(E.c.id > after_id)
            rows = conn.execute(query.order_by(E.c.id).limit(limit)).all()
        return [entry_of(r, account) for r in rows]

    def get_entry(self, key: str) -> Entry:
        """The entry with this idempotency key, or NotFound."""
        with self._s.read() as conn:
            row = conn.execute(select(E).where(E.c.key == key)).first()
            if row is None:
                raise NotFound(f"no entry with key {key!r}")
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return entry_of(row, name)

    def charges_by_resource(
        self, account: str, *, net_of_refunds: bool = False
    ) -> dict[str | None, int]:
        """Amount charged per resource, positive minor units: charges only, or with
        ``net_of_refunds`` less what was refunded to the resource (a package left early):
        what it has cost so far."""
        kinds = [EntryKind.CHARGE.value]
        if net_of_refunds:
            kinds.append(EntryKind.REFUND.value)
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            rows = conn.execute(
                select(E.c.resource, func.sum(E.c.amount_minor))
                .where(E.c.account_id == acct.id, E.c.kind.in_(kinds))
                .group_by(E.c.resource)
            ).all()
        return {res: -int(total) for res, total in rows}

    def charges_by_resources(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """``charges_by_resource`` (charges only) for many (account, resource) pairs in
        one query per ``BATCH`` of them: the operator's batched accruedCost refresh.
        A pair with nothing charged, or of an account the ledger does not know, is
        absent (0)."""
        wanted = set(pairs)
        out: dict[tuple[str, str], int] = {}
        items = sorted(wanted)
        with self._s.read() as conn:
            for i in range(0, len(items), BATCH):
                chunk = items[i : i + BATCH]
                rows = conn.execute(
                    _CHARGES_OF,
                    {
                        "names": sorted({a for a, _ in chunk}),
                        "resources": sorted({res for _, res in chunk}),
                        "kind": EntryKind.CHARGE.value,
                    },
                ).all()
                for name, res, total in rows:
                    if (name, res) in wanted:  # not a cross pair of the chunk's lists
                        out[(name, res)] = -int(total)
        return out

    def spent_by_resource(
        self, account: str, since: datetime, until: datetime
    ) -> dict[str | None, int]:
        """What the account spent per resource in ``[since, until)`` (by each entry's
        ``at``, the statement's rule): its charges net of its refunds, in positive minor
        units (a resource refunded more than charged in the window is negative).
        Recharges and adjustments are not spending. Budgets (gpucloud_operator.budgets)
        read it; a statement's charge and refund lines of the month sum to the same."""
        v.instant(since, "since")
        v.instant(until, "until")
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            rows = conn.execute(
                select(E.c.resource, func.sum(E.c.amount_minor))
                .where(
                    E.c.account_id == acct.id,
                    E.c.kind.in_((EntryKind.CHARGE.value, EntryKind.REFUND.value)),
                    E.c.at >= since,
                    E.c.at < until,
                )
                .group_by(E.c.resource)
            ).all()
        return {res: -int(total) for res, total in rows}
