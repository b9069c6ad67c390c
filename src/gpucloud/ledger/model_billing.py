"""Model billing: request usage the gateway metered and replica online time the operator
saw, turned into charges in the same transaction that records them. A part of the
``Ledger`` facade; the charge rules are pure, in ``gpucloud.billing.model_charges``.

Requests. Each request row is unique on (model, request id) and stores its exact amount
and the exact cumulative total of its *request meter* (paying account, model) after it,
in arrival order. Its posting is ``to_minor(after) - to_minor(before)`` under the key
``model-request:<ns>/<model>:<request id>``, inserted in the transaction that inserts the
row: a row exists if and only if its charge is posted, so recording a batch again (a
gateway killed after the commit, before it forgot its queue) finds the rows and posts
nothing, and a meter's postings add up to its exact total rounded once.

Online time. Replica intervals are unique on (model, replica, start). Settlement posts
the delta between the model's exact online charge (rounded once) and what the ledger
holds for ``model/<ns>/<model>#online``, keyed ``model-online:<ns>/<model>:to:<N>``
(``N``: the total after it) under the owner's row lock, so racing settlers post once.

Locks: the account rows of a batch, in id order, then nothing else; a request row is
only ever inserted under its payer's lock, so two batches holding one request never
wait on each other's unique index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gpucloud.billing import PriceBook, next_posting, to_minor
from gpucloud.billing.model_charges import (
    ModelBillingError,
    ModelPlan,
    ReplicaInterval,
    Rule,
    UsageEvent,
    online_charge,
    request_charge,
)
from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.accounts import Accounts
from gpucloud.ledger.entries import LOCK_ACCOUNT, Entries
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import EntryKind

A, E, R, IV = schema.accounts, schema.entries, schema.model_requests, schema.model_replicas

# (plan, event, payer): payer is the calling account of a public model (None: the owner)
RequestItem = tuple[ModelPlan, UsageEvent, str | None]


@dataclass
class _Acct:
    """What ``Entries.post`` reads of a locked account row, kept current in a batch."""

    id: int
    name: str
    balance_minor: int


@dataclass(frozen=True)
class StoredRequest:
    """A request row as stored (new or imported): ``amount`` and ``cumulative`` fixed."""

    model: str
    request_id: str
    account: str
    source: str
    at: datetime
    runtime_ms: int
    status: int
    prompt_tokens: int
    completion_tokens: int
    images: int
    videos: int
    amount: Decimal | None
    cumulative: Decimal | None


def request_key(model: str, request_id: str) -> str:
    return f"model-request:{model}:{request_id}"


def payer_of(plan: ModelPlan, payer: str | None) -> str:
    """Online-time models bill their owner; public ones the caller (default: the owner)."""
    return plan.account if plan.rule is Rule.ONLINE else (payer or plan.account)


class ModelBilling:
    """Model request usage and replica online time, and their charges."""

    def __init__(self, store: Store, accounts: Accounts, entries: Entries) -> None:
        self._s = store
        self._accounts = accounts
        self._entries = entries

    # -- requests ------------------------------------------------------------------------
    def record_model_requests(
        self, batch: Iterable[RequestItem], pricebook: PriceBook, *, source: str = ""
    ) -> int:
        """Record a batch of requests and post their charges, in one transaction, in
        order; idempotent on (model, request id). Returns how many were new. Payers the
        ledger does not know yet are created (in the price book's currency): a request
        the gateway answered is never refused here. ``source`` names the gateway
        instance (its request counts are rebuilt from its own rows after a restart)."""
        v.text(source, "source", max_len=64, empty=True)
        rows: list[StoredRequest] = []
        for plan, event, payer in batch:
            v.text(event.request_id, "request_id", max_len=255)
            v.instant(event.at, "at")
            amount = request_charge(pricebook, plan, event)
            rows.append(
                StoredRequest(
                    plan.key, event.request_id, payer_of(plan, payer), source, event.at,
                    event.runtime_ms, event.status, event.prompt_tokens,
                    event.completion_tokens, event.images, event.videos, amount, None,
                )
            )  # fmt: skip
        return self.store_requests(rows, pricebook.currency)

    def store_requests(self, rows: Sequence[StoredRequest], currency: str) -> int:
        """Insert request rows (new ones get their ``cumulative``; an imported one keeps
        its own) and post each charge; one transaction. Returns how many were new."""
        if not rows:
            return 0
        for name in {r.account for r in rows} - self._known_accounts({r.account for r in rows}):
            self._accounts.ensure_account(name, currency)
        with self._s.engine.begin() as conn:
            accts = self._lock_accounts(conn, {r.account for r in rows})
            seen = self._existing(conn, [(r.model, r.request_id) for r in rows])
            totals: dict[tuple[int, str], Decimal] = {}
            new: list[dict[str, Any]] = []
            for r in rows:
                if (r.model, r.request_id) in seen:
                    continue
                seen.add((r.model, r.request_id))
                acct = accts[r.account]
                cumulative = None
                if r.amount is not None:
                    meter = (acct.id, r.model)
                    before = totals.get(meter)
                    if before is None:
                        before = self._meter_total(conn, acct.id, r.model)
                    cumulative = r.cumulative if r.cumulative is not None else before + r.amount
                    totals[meter] = cumulative
                    self._post_request(conn, acct, r, cumulative, currency)
                new.append(_row_values(r, acct.id, cumulative))
            if new:
                conn.execute(insert(R), new)
        return len(new)

    def _known_accounts(self, names: set[str]) -> set[str]:
        with self._s.read() as conn:
            return set(conn.execute(select(A.c.name).where(A.c.name.in_(names))).scalars())

    def _lock_accounts(self, conn: Connection, names: set[str]) -> dict[str, _Acct]:
        """Row locks on the batch's accounts, in id order (no two batches deadlock)."""
        ids = conn.execute(select(A.c.id).where(A.c.name.in_(names)).order_by(A.c.id)).scalars()
        out = {}
        for acct_id in list(ids):
            row = conn.execute(LOCK_ACCOUNT, {"acct_id": acct_id}).one()
            out[row.name] = _Acct(row.id, row.name, row.balance_minor)
        return out

    @staticmethod
    def _existing(conn: Connection, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (model, request id) pairs have a row."""
        by_model: dict[str, list[str]] = {}
        for model, request_id in keys:
            by_model.setdefault(model, []).append(request_id)
        found: set[tuple[str, str]] = set()
        for model, ids in by_model.items():
            for chunk in range(0, len(ids), 500):  # bound the IN list
                query = select(R.c.request_id).where(
                    R.c.model == model, R.c.request_id.in_(ids[chunk : chunk + 500])
                )
                found |= {(model, rid) for rid in conn.execute(query).scalars()}
        return found

    @staticmethod
    def _meter_total(conn: Connection, account_id: int, model: str) -> Decimal:
        last = conn.execute(
            select(R.c.cumulative)
            .where(R.c.account_id == account_id, R.c.model == model, R.c.amount.is_not(None))
            .order_by(R.c.id.desc())
            .limit(1)
        ).scalar()
        return Decimal(last) if last is not None else Decimal(0)

    def _post_request(
        self, conn: Connection, acct: _Acct, r: StoredRequest, after: Decimal, currency: str
    ) -> None:
        assert r.amount is not None
        delta = to_minor(after, currency) - to_minor(after - r.amount, currency)
        if delta <= 0:
            return
        meta = {"request_id": r.request_id, "exact": str(r.amount)}
        _, _, acct.balance_minor = self._entries.post(
            conn, acct, EntryKind.CHARGE, -delta, request_key(r.model, r.request_id),
            f"model/{r.model}", f"model request {r.request_id}", r.at, meta,
        )  # fmt: skip

    def model_requests(self, model: str) -> list[dict[str, Any]]:
        """The request rows of one model (``<ns>/<name>``), oldest first, with the
        payer's name as ``account`` (for support and tests)."""
        with self._s.read() as conn:
            rows = conn.execute(select(R).where(R.c.model == model).order_by(R.c.id)).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return [{**r._asdict(), "account": names[r.account_id]} for r in rows]

    def model_requests_known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (model, request id) are recorded."""
        with self._s.read() as conn:
            return self._existing(conn, keys)

    def model_request_stats(
        self, source: str, since: datetime
    ) -> tuple[list[tuple[str, datetime]], dict[str, tuple[int, datetime | None]]]:
        """What gateway instance ``source`` recorded: (model, arrival) of requests since
        ``since``, oldest first, and per model the count and the latest arrival."""
        with self._s.read() as conn:
            arrivals = conn.execute(
                select(R.c.model, R.c.at)
                .where(R.c.source == source, R.c.at >= since)
                .order_by(R.c.at)
            ).all()
            totals = conn.execute(
                select(R.c.model, func.count(), func.max(R.c.at))
                .where(R.c.source == source)
                .group_by(R.c.model)
            ).all()
        # func.max returns its argument's type: the latest arrival comes back a datetime
        return [(m, at) for m, at in arrivals], {m: (int(n), at) for m, n, at in totals}

    def model_exact_total(self, account: str, model: str) -> Decimal:
        """The exact cumulative charge of the (payer, model) request meter."""
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            return self._meter_total(conn, acct.id, model)

    # -- online time ---------------------------------------------------------------------
    def replica_online(self, model: str, replica: str, at: datetime) -> None:
        """A replica started holding its GPUs; idempotent."""
        v.text(replica, "replica")
        v.instant(at, "at")
        key = (IV.c.model == model, IV.c.replica == replica, IV.c.start_at == at)
        try:
            with self._s.engine.begin() as conn:
                if conn.execute(select(IV.c.id).where(*key)).first() is None:
                    conn.execute(insert(IV).values(model=model, replica=replica, start_at=at))
        except IntegrityError:
            pass  # inserted concurrently

    def replica_offline(
        self, model: str, replica: str, at: datetime, *, start: datetime | None = None
    ) -> None:
        """A replica released its GPUs: closes its open interval (idempotent); ``start``:
        only the interval that began then (an import of closed intervals)."""
        v.instant(at, "at")
        where = [IV.c.model == model, IV.c.replica == replica, IV.c.end_at.is_(None)]
        if start is not None:
            where.append(IV.c.start_at == start)
        with self._s.engine.begin() as conn:
            conn.execute(update(IV).where(*where).values(end_at=at))

    def replica_intervals(self, model: str) -> list[ReplicaInterval]:
        with self._s.read() as conn:
            return self._intervals(conn, model)

    @staticmethod
    def _intervals(conn: Connection, model: str) -> list[ReplicaInterval]:
        rows = conn.execute(
            select(IV.c.replica, IV.c.start_at, IV.c.end_at)
            .where(IV.c.model == model)
            .order_by(IV.c.start_at, IV.c.replica)
        ).all()
        return [ReplicaInterval(r, s, e) for r, s, e in rows]

    def settle_model_online(self, plan: ModelPlan, pricebook: PriceBook, now: datetime) -> int:
        """Post the online time of a private model (or deployment) up to ``now``: the
        delta between its exact charge rounded once and what the ledger holds for it, in
        one transaction under the owner's lock. Returns the minor units posted."""
        if plan.rule is not Rule.ONLINE:
            raise ModelBillingError(f"model {plan.key} is public: it is billed per request")
        v.instant(now, "now")
        resource = f"{plan.resource}#online"
        with self._s.engine.begin() as conn:
            row = self._s.account_row(conn, plan.account, lock=True)
            exact = online_charge(pricebook, plan, self._intervals(conn, plan.key), now)
            posted = -int(
                conn.execute(
                    select(func.coalesce(func.sum(E.c.amount_minor), 0)).where(
                        E.c.account_id == row.id,
                        E.c.resource == resource,
                        E.c.kind == EntryKind.CHARGE.value,
                    )
                ).scalar_one()
            )
            delta = next_posting(exact, posted, pricebook.currency)
            if delta == 0:
                return 0
            key = f"model-online:{plan.key}:to:{posted + delta}"
            memo = f"online time of {plan.key} up to {now.isoformat()}"
            acct = _Acct(row.id, row.name, row.balance_minor)
            meta = {"exact_total": str(exact)}
            self._entries.post(conn, acct, EntryKind.CHARGE, -delta, key, resource, memo, now, meta)  # type: ignore[arg-type]
        return delta


def _row_values(r: StoredRequest, account_id: int, cumulative: Decimal | None) -> dict[str, Any]:
    return {
        "model": r.model,
        "request_id": r.request_id,
        "account_id": account_id,
        "source": r.source,
        "at": r.at,
        "runtime_ms": r.runtime_ms,
        "status": r.status,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "images": r.images,
        "videos": r.videos,
        "amount": None if r.amount is None else str(r.amount),
        "cumulative": None if cumulative is None else str(cumulative),
    }


__all__ = ["ModelBilling", "RequestItem", "StoredRequest", "payer_of", "request_key"]
