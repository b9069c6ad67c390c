"""The model billing store: request usage from the gateway and replica online time,
posted to the ledger. The charge rules themselves are pure, in
``gpucloud.billing.model_charges``.

Rounding follows the project's rule for growing charges. Per-request charges go
through a *request meter* per (paying account, model): each request row stores the exact
cumulative total after it, in arrival order, and its posting is
``to_minor(cumulative after) - to_minor(cumulative before)`` under the key
``model-request:<ns>/<model>:<request id>``. The amount of a request is fixed once its
row exists, so a retried posting is a ledger replay, and the postings of a meter always
add up to its exact total rounded once. Online time is settled by
:meth:`BillingStore.settle_online`: the posting that brings the model's online charges to
``N`` minor units is keyed ``model-online:<ns>/<model>:to:<N>``, so two settlers racing
(or one retrying after a crash) post it once.

The store is a small SQLite file (stdlib ``sqlite3``, WAL): one writer, the gateway's
metering task; the operator opens its own to record replica intervals and settle online
time. It lives outside both components so that neither imports the other.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

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


class Poster(Protocol):
    """The part of ``gpucloud.ledger.Ledger`` billing uses."""

    def post_entry(
        self,
        account: str,
        kind: Any,
        amount_minor: int,
        key: str,
        *,
        resource: str | None = None,
        memo: str = "",
        at: datetime,
        meta: dict[str, Any] | None = None,
    ) -> Any: ...

    def charges_by_resource(self, account: str) -> dict[str | None, int]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    meter TEXT NOT NULL,            -- '<account>|<ns>/<model>'
    request_id TEXT NOT NULL,
    account TEXT NOT NULL,
    model TEXT NOT NULL,            -- '<ns>/<model>'
    at TEXT NOT NULL,
    runtime_ms INTEGER NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    images INTEGER NOT NULL,
    videos INTEGER NOT NULL,
    amount TEXT,                    -- exact Decimal; NULL: not billed per request
    cumulative TEXT,                -- exact meter total after this request
    posted INTEGER NOT NULL DEFAULT 0,
    UNIQUE (model, request_id)
);
CREATE INDEX IF NOT EXISTS requests_unposted ON requests (posted, seq);
CREATE INDEX IF NOT EXISTS requests_meter ON requests (meter, seq);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
CREATE TABLE IF NOT EXISTS replica_intervals (
    model TEXT NOT NULL,
    replica TEXT NOT NULL,
    start_at TEXT NOT NULL,
    end_at TEXT,
    PRIMARY KEY (model, replica, start_at)
);
"""


def _iso(when: datetime) -> str:
    if when.tzinfo is None:
        raise ModelBillingError(f"timestamps must be timezone-aware, got {when!r}")
    return when.astimezone(UTC).isoformat()


class BillingStore:
    """Request usage and replica intervals, and their postings to the ledger.

    The ``requests`` table is the gateway's outbox: a row is written (committed) before
    the caller gets the last bytes of its response, and posted to the ledger later by
    :meth:`post_pending`. It lives in its own SQLite file, so recording never waits on
    the ledger's write lock. ``fsync``: ``True`` (the default, as the operator's replica
    intervals need) syncs every commit to disk (survives a power loss; ~3 ms a commit
    here); ``False`` (WAL, synchronous=NORMAL: the gateway's default) survives a killed
    process, and :meth:`checkpoint`, run every second by the poster, bounds what a host
    crash can take.
    """

    def __init__(self, path: str | Path, pricebook: PriceBook, *, fsync: bool = True) -> None:
        self.pricebook = pricebook
        self.path = str(path)
        self._lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    # -- requests ------------------------------------------------------------------------
    def record(self, plan: ModelPlan, event: UsageEvent, payer: str | None = None) -> bool:
        """Store one request's usage (idempotent on the request id); False if already there.
        ``payer`` is the calling account of a public model (default: the owner)."""
        return self.record_many([(plan, event, payer)]) == 1

    def record_many(self, batch: Iterable[tuple[ModelPlan, UsageEvent, str | None]]) -> int:
        """Store a batch in one transaction, in order; returns how many were new."""
        new = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for plan, event, payer in batch:
                    new += self._insert(plan, event, payer)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def _insert(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> bool:
        account = plan.account if plan.rule is Rule.ONLINE else (payer or plan.account)
        amount = request_charge(self.pricebook, plan, event)
        meter = f"{account}|{plan.key}"
        seen = self._db.execute(
            "SELECT 1 FROM requests WHERE model = ? AND request_id = ?",
            (plan.key, event.request_id),
        ).fetchone()
        if seen:
            return False
        cumulative = None
        if amount is not None:
            last = self._db.execute(
                "SELECT cumulative FROM requests WHERE meter = ? AND amount IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1",
                (meter,),
            ).fetchone()
            cumulative = str((Decimal(last[0]) if last else Decimal(0)) + amount)
        self._db.execute(
            "INSERT INTO requests (meter, request_id, account, model, at, runtime_ms,"
            " status, prompt_tokens, completion_tokens, images, videos, amount,"
            " cumulative, posted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                meter,
                event.request_id,
                account,
                plan.key,
                _iso(event.at),
                event.runtime_ms,
                event.status,
                event.prompt_tokens,
                event.completion_tokens,
                event.images,
                event.videos,
                None if amount is None else str(amount),
                cumulative,
                1 if amount is None else 0,
            ),
        )
        return True

    def post_pending(self, ledger: Poster, limit: int = 1000) -> int:
        """Post the charges of requests not yet posted; returns how many rows were done.
        Safe to re-run after a crash at any point (each posting's key and amount are
        fixed by its row, and the ledger replays a known key)."""
        from gpucloud.ledger import EntryKind  # the ledger is optional for the gateway

        currency = self.pricebook.currency
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, request_id, account, model, at, amount, cumulative FROM requests "
                "WHERE posted = 0 ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        done: list[tuple[int]] = []
        try:
            for seq, request_id, account, model, at, amount, cumulative in rows:
                after = Decimal(cumulative)
                delta = to_minor(after, currency) - to_minor(after - Decimal(amount), currency)
                if delta > 0:
                    ledger.post_entry(
                        account,
                        EntryKind.CHARGE,
                        -delta,
                        f"model-request:{model}:{request_id}",
                        resource=f"model/{model}",
                        memo=f"model request {request_id}",
                        at=datetime.fromisoformat(at),
                        meta={"request_id": request_id, "exact": amount},
                    )
                done.append((seq,))
        finally:  # one write for the batch: the outbox is not held up by posting
            if done:
                self._mark_posted(done)
        return len(rows)

    def _mark_posted(self, seqs: list[tuple[int]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE requests SET posted = 1 WHERE seq = ?", seqs)
            self._db.execute("COMMIT")

    def pending(self) -> int:
        """Rows not yet posted to the ledger."""
        with self._lock:
            return int(
                self._db.execute("SELECT count(*) FROM requests WHERE posted = 0").fetchone()[0]
            )

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, syncing both to disk: what
        was committed before this survives a host crash too. Its own connection: a
        passive checkpoint does not stop the outbox's writer."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._checkpointer.execute("PRAGMA busy_timeout=10000")
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def arrivals(self, since: datetime) -> list[tuple[str, datetime]]:
        """(model, arrival time) of the requests that arrived at or after ``since``,
        oldest first: the autoscaler's window, rebuilt after a restart."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, at FROM requests WHERE at >= ? ORDER BY at", (_iso(since),)
            ).fetchall()
        return [(m, datetime.fromisoformat(at)) for m, at in rows]

    def totals(self) -> dict[str, tuple[int, datetime | None]]:
        """Requests recorded per model, and the latest arrival."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, count(*), max(at) FROM requests GROUP BY model"
            ).fetchall()
        return {m: (n, datetime.fromisoformat(last) if last else None) for m, n, last in rows}

    def requests(self, model_key: str) -> list[dict[str, Any]]:
        """The stored request rows of one model, oldest first (for tests and support)."""
        with self._lock:
            cur = self._db.execute(
                "SELECT * FROM requests WHERE model = ? ORDER BY seq", (model_key,)
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def exact_total(self, account: str, model_key: str) -> Decimal:
        with self._lock:
            row = self._db.execute(
                "SELECT cumulative FROM requests WHERE meter = ? AND amount IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1",
                (f"{account}|{model_key}",),
            ).fetchone()
        return Decimal(row[0]) if row else Decimal(0)

    # -- online time -----------------------------------------------------------------------
    def replica_online(self, plan: ModelPlan, replica: str, at: datetime) -> None:
        """A replica started holding its GPUs (scheduled); idempotent."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO replica_intervals (model, replica, start_at) "
                "VALUES (?, ?, ?)",
                (plan.key, replica, _iso(at)),
            )

    def replica_offline(self, plan: ModelPlan, replica: str, at: datetime) -> None:
        """A replica released its GPUs; closes its open interval (idempotent)."""
        with self._lock:
            self._db.execute(
                "UPDATE replica_intervals SET end_at = ? "
                "WHERE model = ? AND replica = ? AND end_at IS NULL",
                (_iso(at), plan.key, replica),
            )

    def intervals(self, plan: ModelPlan) -> list[ReplicaInterval]:
        with self._lock:
            rows = self._db.execute(
                "SELECT replica, start_at, end_at FROM replica_intervals WHERE model = ? "
                "ORDER BY start_at, replica",
                (plan.key,),
            ).fetchall()
        return [
            ReplicaInterval(r, datetime.fromisoformat(s), e and datetime.fromisoformat(e))
            for r, s, e in rows
        ]

    def settle_online(self, ledger: Poster, plan: ModelPlan, now: datetime) -> int:
        """Post the online time of a private model (or deployment) up to ``now``: the
        delta between its exact online charge rounded once and what the ledger already
        holds for it. Returns the minor units posted (0 if nothing was due)."""
        from gpucloud.ledger import EntryKind

        if plan.rule is not Rule.ONLINE:
            raise ModelBillingError(f"model {plan.key} is public: it is billed per request")
        exact = online_charge(self.pricebook, plan, self.intervals(plan), now)
        resource = f"{plan.resource}#online"
        posted = ledger.charges_by_resource(plan.account).get(resource, 0)
        delta = next_posting(exact, posted, self.pricebook.currency)
        if delta == 0:
            return 0
        target = posted + delta
        ledger.post_entry(
            plan.account,
            EntryKind.CHARGE,
            -delta,
            f"model-online:{plan.key}:to:{target}",
            resource=resource,
            memo=f"online time of {plan.key} up to {_iso(now)}",
            at=now,
            meta={"exact_total": str(exact)},
        )
        return delta
