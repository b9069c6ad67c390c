"""The Ledger facade: every public operation is one database transaction (or a few)."""

from __future__ import annotations

import uuid
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gpucloud.billing.decisions import available_balance
from gpucloud.billing.intervals import elapsed_seconds
from gpucloud.billing.money import minor_exponent, next_posting
from gpucloud.clock import Clock, SystemClock
from gpucloud.ledger import admission, db, ingest, rating, schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.errors import (
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    OrderRefused,
    ReviewRefused,
)
from gpucloud.ledger.image_copies import ImageCopiesMixin
from gpucloud.ledger.types import (
    Account,
    AuditEvent,
    Entry,
    EntryKind,
    IngestResult,
    Meter,
    MeterKind,
    MeterUnit,
    Order,
    OrderStatus,
    PostResult,
    Unposted,
    UnratedUsage,
    UsageSummaryRow,
    Voucher,
    VoucherStatus,
)
from gpucloud.ledger.wipes import WipesMixin
from gpucloud.ledger.wire import WireBatch
from gpucloud.usage import UsageKind, UsageRecord

A, E, U, M, ORD, VO, AU = (
    schema.accounts,
    schema.entries,
    schema.usage,
    schema.meters,
    schema.orders,
    schema.vouchers,
    schema.audit,
)
_RATE_CHUNK = 20_000  # usage rows rated per transaction and meter

# Statements of the metering hot path, built once: building a statement costs more than
# running it (compiled forms are cached by SQLAlchemy either way).
_ENTRY_BY_KEY = select(E).where(E.c.key == bindparam("key"))
_INSERT_ENTRY = insert(E).returning(E.c.id)
_SET_BALANCE = update(A).where(A.c.id == bindparam("acct_id")).values(balance_minor=bindparam("b"))
_LOCK_ACCOUNT = select(A).where(A.c.id == bindparam("acct_id")).with_for_update()
_LOCK_METERS_OF = (
    select(M)
    .where(
        M.c.kind.in_(bindparam("kinds", expanding=True)),
        M.c.subject.in_(bindparam("owners", expanding=True)),
    )
    .order_by(M.c.opened_at)
    .with_for_update()
)
_SET_METER = (
    update(M)
    .where(M.c.meter_id == bindparam("mid"))
    .values(
        quantity_rated=bindparam("q"),
        posted_minor=bindparam("posted"),
        seq=bindparam("s"),
        last_usage_end=bindparam("last"),
    )
)


def open_ledger(url: str, *, clock: Clock | None = None) -> Ledger:
    """Open (creating or migrating to the newest schema) the ledger at ``url``.

    ``sqlite:///path/to/ledger.db`` is the embedded default (WAL, busy timeout, writers
    serialised with BEGIN IMMEDIATE); ``postgresql+psycopg://user@host:port/db`` is for
    production (row locks with SELECT ... FOR UPDATE). Alembic migrations run to head;
    opening from several processes at once is safe. ``clock`` stamps audit records.
    """
    engine = db.make_engine(url)
    db.migrate(engine)
    return Ledger(engine, clock)


def _entry(row: Row[Any], account: str) -> Entry:
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


def _meter(row: Row[Any], account: str) -> Meter:
    return Meter(
        meter_id=row.meter_id,
        account=account,
        resource=row.resource,
        kind=MeterKind(row.kind),
        subject=row.subject,
        unit_price=Decimal(row.unit_price),
        unit=MeterUnit(row.unit),
        opened_at=row.opened_at,
        closed_at=row.closed_at,
        memo=row.memo,
        gpus=row.gpus,
        quantity_rated=int(row.quantity_rated),
        posted_minor=row.posted_minor,
        seq=row.seq,
        settled_at=row.settled_at,
        fallback_quantity=int(row.fallback_quantity),
        fallback_minor=int(row.fallback_minor),
        late_quantity=int(row.late_quantity),
        late_records=int(row.late_records),
        node=row.node,
        gpu_uuids=tuple(admission.uuids_of(row.gpu_uuids)),
        max_bytes=row.max_bytes,
    )


def _order(row: Row[Any], account: str) -> Order:
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


def _voucher(row: Row[Any], account: str) -> Voucher:
    return Voucher(
        voucher_id=row.voucher_id,
        account=account,
        amount_minor=row.amount_minor,
        payer=row.payer,
        bank=row.bank,
        transfer_no=row.transfer_no,
        file_sha256=row.file_sha256,
        status=VoucherStatus(row.status),
        submitted_at=row.submitted_at,
        reviewer=row.reviewer,
        reason=row.reason,
        reviewed_at=row.reviewed_at,
        entry_id=row.entry_id,
        submitter=row.submitter,
    )


def _check_sign(kind: EntryKind, amount: int) -> None:
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


class Ledger(WipesMixin, ImageCopiesMixin):
    """The durable record of accounts, entries, usage, meters, orders and vouchers.

    Thread-safe and process-safe: share one Ledger between threads, open one per process.
    """

    def __init__(self, engine: Engine, clock: Clock | None = None) -> None:
        self.engine = engine
        self.clock: Clock = clock or SystemClock()

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # -- helpers ----------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: one consistent snapshot, and on SQLite a deferred
        BEGIN so readers do not queue behind writers for the write lock."""
        with self.engine.connect() as conn:
            conn.execution_options(**{db.READ_ONLY: True})
            if self.dialect == "postgresql":  # one snapshot for the whole read
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def _account_row(self, conn: Connection, name: str, *, lock: bool = False) -> Row[Any]:
        query = select(A).where(A.c.name == name)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"account {name!r} does not exist")
        return row

    def _names(self, conn: Connection, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        rows = conn.execute(select(A.c.id, A.c.name).where(A.c.id.in_(ids))).all()
        return {i: n for i, n in rows}

    def _audit(
        self,
        conn: Connection,
        account_id: int | None,
        actor: str,
        action: str,
        subject: str,
        detail: dict[str, Any],
        at: datetime | None = None,
    ) -> None:
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

    def _post(
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
        existing = conn.execute(_ENTRY_BY_KEY, {"key": key}).first()
        if existing is not None:
            self._same_entry(conn, existing, acct.id, kind, amount, resource, key)
            return _entry(existing, acct.name), False, acct.balance_minor
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
                "recorded_at": self.clock.now(),
            },
        ).scalar_one()
        conn.execute(_SET_BALANCE, {"acct_id": acct.id, "b": new_balance})
        entry = Entry(entry_id, acct.name, kind, amount, key, resource, memo, at, meta, new_balance)
        return entry, True, new_balance

    def _same_entry(
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

    # -- accounts -------------------------------------------------------------------
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
                with self.engine.begin() as conn:
                    row = conn.execute(select(A).where(A.c.name == name)).first()
                    if row is None:
                        conn.execute(
                            insert(A).values(
                                name=name,
                                currency=currency,
                                balance_minor=0,
                                created_at=self.clock.now(),
                            )
                        )
                        row = self._account_row(conn, name)
                break
            except IntegrityError:  # created concurrently: read it on the next turn
                continue
        if row is None:
            with self._read() as conn:
                row = self._account_row(conn, name)
        if row.currency != currency:
            raise InvalidInput(
                f"currency: account {name!r} already exists in {row.currency}, not {currency}"
            )
        return Account(row.name, row.currency, row.balance_minor, row.created_at)

    def get_account(self, name: str) -> Account:
        """The account, or NotFound."""
        with self._read() as conn:
            row = self._account_row(conn, name)
        return Account(row.name, row.currency, row.balance_minor, row.created_at)

    def accounts(self) -> list[Account]:
        """All accounts, by name."""
        with self._read() as conn:
            rows = conn.execute(select(A).order_by(A.c.name)).all()
        return [Account(r.name, r.currency, r.balance_minor, r.created_at) for r in rows]

    # -- entries --------------------------------------------------------------------
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
        _check_sign(kind, amount)
        v.text(key, "key", max_len=255)
        if resource is not None:
            v.text(resource, "resource")
        v.text(memo, "memo", max_len=4000, empty=True)
        v.instant(at, "at")
        meta = dict(meta or {})
        try:
            with self.engine.begin() as conn:
                acct = self._account_row(conn, account, lock=True)
                entry, created, _ = self._post(
                    conn, acct, kind, amount, key, resource, memo, at, meta
                )
                if created:
                    actor = str(meta.get("actor", "system"))
                    detail = {"kind": kind.value, "amount_minor": amount, "memo": memo}
                    self._audit(conn, acct.id, actor, "entry.posted", key, detail, at)
        except IntegrityError:
            # The same key was inserted concurrently (for another account, whose row lock
            # we did not hold): it exists now, so this is a replay or a conflict.
            with self.engine.begin() as conn:
                acct = self._account_row(conn, account)
                row = conn.execute(select(E).where(E.c.key == key)).first()
                if row is None:
                    raise
                self._same_entry(conn, row, acct.id, kind, amount, resource, key)
                return PostResult(_entry(row, account), False)
        return PostResult(entry, created)

    def balance(self, account: str) -> int:
        """The account balance in minor units: exactly the sum of its entries."""
        with self._read() as conn:
            return int(self._account_row(conn, account).balance_minor)

    def entries_sum(self, account: str) -> int:
        """The sum of the account's entries computed from the entries themselves (for
        audits and tests of the cached balance)."""
        with self._read() as conn:
            acct = self._account_row(conn, account)
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
        with self._read() as conn:
            acct = self._account_row(conn, account)
            query = select(E).where(E.c.account_id == acct.id)
            if resource is not None:
                query = query.where(E.c.resource == resource)
            if after_id is not None:
                query = query.where(E.c.id > after_id)
            rows = conn.execute(query.order_by(E.c.id).limit(limit)).all()
        return [_entry(r, account) for r in rows]

    def get_entry(self, key: str) -> Entry:
        """The entry with this idempotency key, or NotFound."""
        with self._read() as conn:
            row = conn.execute(select(E).where(E.c.key == key)).first()
            if row is None:
                raise NotFound(f"no entry with key {key!r}")
            name = self._names(conn, {row.account_id})[row.account_id]
        return _entry(row, name)

    # -- usage ----------------------------------------------------------------------
    def ingest_usage(
        self,
        records: Sequence[UsageRecord] | WireBatch,
        *,
        received_at: datetime,
        rate_at: datetime | None = None,
    ) -> IngestResult:
        """Store a batch of usage records in one transaction.

        ``records``: UsageRecord models, or a WireBatch (``gpucloud.ledger.wire.
        parse_batch``: JSON checked straight into dicts, the fast path of the API).

        Idempotent on ``record.natural_key``: same key and content is a duplicate (no-op),
        same key with other content is rejected. A record that overlaps another record
        of the same subject (a GPU, or a volume) with a different start is rejected, so no
        GPU-second is counted twice. Rejections are reported as (index, reason); the
        rest of the batch is accepted.

        ``rate_at``: also rate, in the same transaction, each accepted record that ends
        by ``rate_at`` and lies wholly inside the window of the only meter of its
        subject whose window it touches: exactly what ``rate_pending(rate_at)`` would
        then do, without writing the record twice. The rest waits for rate_pending.
        """
        v.instant(received_at, "received_at")
        if rate_at is not None:
            v.instant(rate_at, "rate_at")
        if not records:
            return IngestResult(0, 0, [])
        with self.engine.begin() as conn:
            loaded: list[Row[Any]] = []
            rater = None
            if rate_at is not None:
                rater = lambda rows: self._rate_new(conn, rows, rate_at, loaded)  # noqa: E731
            guard = lambda rows, rejected, rules: self._admit(  # noqa: E731
                conn, rows, rejected, rules, loaded, received_at
            )
            return ingest.ingest(conn, records, received_at, rater, guard)

    def _admit(
        self,
        conn: Connection,
        rows: list[tuple[int, ingest.Row]],
        rejected: list[tuple[int, str]],
        rules: dict[int, str],
        loaded: list[Row[Any]],
        at: datetime,
    ) -> list[tuple[int, ingest.Row]]:
        """Refuse the records their meters may not be charged for (gpucloud.ledger.
        admission): another node's, a GPU beyond the pod's count, more bytes than the
        volume holds. Loads (and locks) the batch's meters into ``loaded`` for the rater;
        binds first reports; one audit event per meter and rule refused."""
        if not rows:
            return rows
        kinds = list({r[ingest.KIND] for _, r in rows})
        owners = list({r[ingest.OWNER] for _, r in rows})
        loaded.extend(conn.execute(_LOCK_METERS_OF, {"kinds": kinds, "owners": owners}))
        if not loaded:
            return rows
        meters: dict[tuple[str, str], list[admission.Terms]] = {}
        for m in loaded:
            meters.setdefault((m.kind, m.subject), []).append(admission.Terms.of(m))
        guard = admission.Guard(meters)
        kept = []
        at_ = ingest  # row positions
        for i, r in rows:
            refusal = guard.check(
                r[at_.KIND], r[at_.OWNER], r[at_.NODE], r[at_.SUBJECT],
                r[at_.START], r[at_.END], r[at_.QUANTITY],
            )  # fmt: skip
            if refusal is None:
                kept.append((i, r))
            else:
                rules[i], reason = refusal
                rejected.append((i, reason))
        admission.save(conn, guard.all_terms())
        for meter_id, refusals in guard.refused.items():
            by_rule: dict[str, list[tuple[str, str, str]]] = {}
            for item in refusals:
                by_rule.setdefault(item[0], []).append(item)
            for rule, items in by_rule.items():
                detail = {"rule": rule, "records": len(items), "first": items[0][1]}
                actor = f"node:{items[0][2]}"
                account_id = guard.account_of(meter_id)
                self._audit(conn, account_id, actor, "usage.refused", meter_id, detail, at)
        return kept

    def _rate_new(
        self, conn: Connection, rows: list[ingest.Row], now: datetime, loaded: list[Row[Any]]
    ) -> list[ingest.Row]:
        """The rater of ingest_usage(rate_at=now): rows about to be inserted, returned
        with their rating columns set where a meter rated them. ``loaded``: the batch's
        meters, locked (by _admit)."""
        now_s = schema.to_us(now) // 1_000_000
        due = [r for r in rows if r[ingest.END] <= now_s]
        if not due:
            return rows
        meters: dict[tuple[str, str], list[tuple[Row[Any], int, int | None]]] = {}
        # (_admit's bindings changed only node and gpu_uuids, which rating does not read)
        for m in loaded:
            opened = schema.to_us(m.opened_at) // 1_000_000
            closed = None if m.closed_at is None else schema.to_us(m.closed_at) // 1_000_000
            meters.setdefault((m.kind, m.subject), []).append((m, opened, closed))
        if not meters:
            return rows
        # meter_id -> (meter row, indexes of the rows it rates)
        rated: dict[str, tuple[Row[Any], list[int]]] = {}
        for i, r in enumerate(rows):
            start, end = r[ingest.START], r[ingest.END]
            candidates = meters.get((r[ingest.KIND], r[ingest.OWNER]))
            if end > now_s or candidates is None:
                continue
            if len(candidates) > 1:  # only the one meter it touches, if it touches one
                candidates = [
                    (m, o, c) for m, o, c in candidates if end > o and (c is None or start < c)
                ]
                if len(candidates) != 1:  # none, or split between meters: rate_pending clips it
                    continue
            m, o, c = candidates[0]
            if o <= start and (c is None or end <= c):  # wholly inside its window
                rated.setdefault(m.meter_id, (m, []))[1].append(i)
        if not rated:
            return rows
        out = list(rows)
        rated_at = schema.to_us(now)
        for meter_id, (m, indexes) in rated.items():
            # Wholly inside the window: a record's measure is what rating counts for it.
            quantity = sum(rows[i][ingest.MEASURE] for i in indexes)
            last_end = max(rows[i][ingest.END] for i in indexes)
            self._charge(conn, m, quantity, last_end, now, len(indexes))
            for i in indexes:
                out[i] = (*rows[i][: ingest.RATED.start], rows[i][ingest.END], meter_id, rated_at)
        return out

    def unrated_usage(self, *, limit: int = 1000) -> list[UnratedUsage]:
        """Usage no meter has rated: no meter for its subject, or outside every
        meter's open interval. Never charged to anyone; listed for operators."""
        with self._read() as conn:
            rows = conn.execute(
                select(U).where(U.c.rated_until < U.c.end_s).order_by(U.c.id).limit(limit)
            ).all()
        return [
            UnratedUsage(
                r.id,
                r.kind,
                r.subject,
                r.owner,
                r.start_s,
                r.end_s,
                r.rated_until,
                r.quantity,
                r.node,
                r.namespace,
                r.received_at,
            )
            for r in rows
        ]

    def usage_summary(
        self,
        account: str | None = None,
        namespace: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageSummaryRow]:
        """GPU-seconds and byte-seconds per (resource, kind), of usage whose start is in
        [since, until). ``account`` restricts to usage rated by that account's meters;
        without it, unrated usage appears with resource None."""
        gpu = U.c.kind == UsageKind.GPU_TIME.value
        query = (
            select(
                M.c.resource,
                U.c.kind,
                func.sum(U.c.measure).filter(gpu),
                func.sum(U.c.measure).filter(~gpu),
                func.count(),
            )
            .select_from(U.outerjoin(M, M.c.meter_id == U.c.meter_id))
            .group_by(M.c.resource, U.c.kind)
            .order_by(M.c.resource, U.c.kind)
        )
        with self._read() as conn:
            if account is not None:
                query = query.where(M.c.account_id == self._account_row(conn, account).id)
            if namespace is not None:
                query = query.where(U.c.namespace == namespace)
            if kind is not None:
                query = query.where(U.c.kind == v.choice(kind, UsageKind, "kind").value)
            if since is not None:
                query = query.where(U.c.start_s >= v.instant(since, "since").timestamp())
            if until is not None:
                query = query.where(U.c.start_s < v.instant(until, "until").timestamp())
            rows = conn.execute(query).all()
        return [
            UsageSummaryRow(res, k, int(g or 0), int(b or 0), int(n)) for res, k, g, b, n in rows
        ]

    def charges_by_resource(self, account: str) -> dict[str | None, int]:
        """Net amount charged per resource, positive minor units (charges only)."""
        with self._read() as conn:
            acct = self._account_row(conn, account)
            rows = conn.execute(
                select(E.c.resource, func.sum(E.c.amount_minor))
                .where(E.c.account_id == acct.id, E.c.kind == EntryKind.CHARGE.value)
                .group_by(E.c.resource)
            ).all()
        return {res: -int(total) for res, total in rows}

    # -- meters ---------------------------------------------------------------------
    def open_meter(
        self,
        meter_id: str,
        *,
        account: str,
        resource: str,
        kind: MeterKind | str,
        subject: str,
        unit_price: Decimal,
        unit: MeterUnit | str,
        opened_at: datetime,
        memo: str = "",
        gpus: int = 1,
        node: str | None = None,
        max_bytes: int | None = None,
    ) -> Meter:
        """Start rating usage of ``subject`` (a pod UID for gpu_time, else a volume id)
        against ``account`` at ``unit_price`` per GPU-hour or per GiB-hour.

        Idempotent: the same meter_id with the same terms returns the meter (other terms
        raise IdempotencyConflict). One open meter per (kind, subject) at a time.

        What it may be charged for (gpucloud.ledger.admission): usage reported by
        ``node`` only (None: the node of the first report), for at most ``gpus`` GPU
        UUIDs (the first ones reported), and for a volume at most ``max_bytes`` bytes
        (its quota or capacity; None: no cap). ``gpus`` also drives accrual estimates.
        """
        v.text(meter_id, "meter_id")
        v.text(resource, "resource")
        v.text(subject, "subject")
        kind = v.choice(kind, MeterKind, "kind")
        unit = v.choice(unit, MeterUnit, "unit")
        if rating.UNIT_FOR_KIND[kind] is not unit:
            raise InvalidInput(
                f"unit: a {kind.value} meter is priced per {rating.UNIT_FOR_KIND[kind].value}, "
                f"not {unit.value}"
            )
        price = v.price(unit_price, "unit_price")
        v.instant(opened_at, "opened_at")
        v.text(memo, "memo", max_len=4000, empty=True)
        v.positive(gpus, "gpus")
        if node is not None:
            v.text(node, "node")
        if max_bytes is not None:
            v.positive(max_bytes, "max_bytes")
        with self.engine.begin() as conn:
            acct = self._account_row(conn, account, lock=True)
            row = conn.execute(select(M).where(M.c.meter_id == meter_id)).first()
            if row is not None:
                same = (
                    row.account_id == acct.id
                    and row.resource == resource
                    and row.kind == kind.value
                    and row.subject == subject
                    and Decimal(row.unit_price) == price
                    and row.unit == unit.value
                    and row.opened_at == opened_at
                )
                if not same:
                    raise IdempotencyConflict(f"meter:{meter_id}", "meter opened with other terms")
                return _meter(row, account)
            clash = conn.execute(
                select(M.c.meter_id).where(
                    M.c.kind == kind.value, M.c.subject == subject, M.c.closed_at.is_(None)
                )
            ).first()
            if clash is not None:
                raise InvalidInput(
                    f"subject: {kind.value} {subject!r} already has open meter {clash[0]!r}; "
                    "close it first"
                )
            conn.execute(
                insert(M).values(
                    meter_id=meter_id,
                    account_id=acct.id,
                    resource=resource,
                    kind=kind.value,
                    subject=subject,
                    unit_price=str(price),
                    unit=unit.value,
                    opened_at=opened_at,
                    closed_at=None,
                    memo=memo,
                    gpus=gpus,
                    quantity_rated="0",
                    posted_minor=0,
                    seq=0,
                    last_usage_end=None,
                    node=node,
                    max_bytes=max_bytes,
                )
            )
            row = conn.execute(select(M).where(M.c.meter_id == meter_id)).one()
        return _meter(row, account)

    def close_meter(self, meter_id: str, at: datetime) -> Meter:
        """Stop the meter at ``at``: usage after it is not rated by this meter.
        Idempotent (closing again keeps the first close time)."""
        v.instant(at, "at")
        with self.engine.begin() as conn:
            row = self._meter_row(conn, meter_id, lock=True)
            if row.closed_at is None:
                if at < row.opened_at:
                    raise InvalidInput(f"at: {at} is before the meter opened ({row.opened_at})")
                conn.execute(update(M).where(M.c.meter_id == meter_id).values(closed_at=at))
                row = self._meter_row(conn, meter_id)
            name = self._names(conn, {row.account_id})[row.account_id]
        return _meter(row, name)

    def settle_meter(
        self,
        meter_id: str,
        at: datetime,
        *,
        fallback: bool = False,
        memo: str = "",
        meta: dict[str, Any] | None = None,
    ) -> Meter:
        """Finalize a closed meter: from now on its usage is never charged again.

        In one transaction: rate the meter's pending usage (ended by ``at``); then, with
        ``fallback`` (gpu_time meters only), bill the GPU-seconds the agents did not
        report from the control plane's timestamps (``gpus`` x whole seconds from
        opened_at to closed_at), as the delta of the rounded cumulative total, key
        ``meter-fallback:{meter_id}``; and mark the meter settled. Usage of the meter's
        window that arrives later is stored (idempotently, as any usage) and rated as
        *late*: counted in ``late_records``/``late_quantity``, not charged. So a run is
        charged at most once for each second it held its GPUs, whichever source told.

        Idempotent: settling a settled meter returns it unchanged. A fallback entry that
        already exists (posted by an earlier operator outside this method) is adopted,
        not posted again. InvalidInput for an open meter.
        """
        v.instant(at, "at")
        v.text(memo, "memo", max_len=4000, empty=True)
        with self.engine.begin() as conn:
            ingest.lock_usage(conn)  # PostgreSQL: no usage is rated concurrently
            row = self._meter_row(conn, meter_id, lock=True)
            if row.settled_at is None:
                self._settle(conn, row, at, fallback, memo, dict(meta or {}))
                row = self._meter_row(conn, meter_id)
            name = self._names(conn, {row.account_id})[row.account_id]
        return _meter(row, name)

    def _settle(
        self,
        conn: Connection,
        row: Row[Any],
        at: datetime,
        fallback: bool,
        memo: str,
        meta: dict[str, Any],
    ) -> None:
        meter_id = row.meter_id
        if row.closed_at is None:
            raise InvalidInput(f"meter_id: meter {meter_id!r} is still open; close it first")
        if at < row.closed_at:
            raise InvalidInput(f"at: {at} is before the meter closed ({row.closed_at})")
        if fallback and row.kind != MeterKind.GPU_TIME.value:
            raise InvalidInput(
                f"fallback: only gpu_time meters are billed from control-plane timestamps, "
                f"meter {meter_id!r} is {row.kind}"
            )
        at_s = schema.to_us(at) // 1_000_000
        while self._rate_meter(conn, meter_id, at, at_s) >= _RATE_CHUNK:
            pass  # a backlog: rated in chunks, all inside this transaction
        row = self._meter_row(conn, meter_id)
        acct = conn.execute(_LOCK_ACCOUNT, {"acct_id": row.account_id}).one()
        meter = _meter(row, acct.name)
        held = row.gpus * elapsed_seconds(row.opened_at, row.closed_at)
        missing = held - meter.quantity_rated if fallback else 0
        amount = 0
        if missing > 0:
            key = f"meter-fallback:{meter_id}"
            existing = conn.execute(_ENTRY_BY_KEY, {"key": key}).first()
            if existing is not None:  # posted before settlement existed: adopt it
                amount = -existing.amount_minor
            else:
                exact = rating.exact_cost(held, meter)
                amount = next_posting(exact, meter.posted_minor, acct.currency)
                if amount:
                    meta = {**meta, "meter_id": meter_id, "gpu_seconds": missing}
                    self._post(
                        conn, acct, EntryKind.CHARGE, -amount, key, row.resource, memo, at, meta
                    )
        conn.execute(
            update(M)
            .where(M.c.meter_id == meter_id)
            .values(
                settled_at=at,
                fallback_quantity=max(missing, 0),
                fallback_minor=amount,
                posted_minor=row.posted_minor + amount,
            )
        )

    def _meter_row(self, conn: Connection, meter_id: str, *, lock: bool = False) -> Row[Any]:
        query = select(M).where(M.c.meter_id == meter_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"meter {meter_id!r} does not exist")
        return row

    def get_meter(self, meter_id: str) -> Meter:
        with self._read() as conn:
            row = self._meter_row(conn, meter_id)
            name = self._names(conn, {row.account_id})[row.account_id]
        return _meter(row, name)

    def meters(
        self,
        account: str | None = None,
        *,
        open_only: bool = False,
        late_only: bool = False,
        newest: int | None = None,
    ) -> list[Meter]:
        """Meters by opening time. ``late_only``: settled meters that received usage
        after their settlement (stored, not charged: for operators to look into).
        ``newest``: only that many, the most recently opened first."""
        with self._read() as conn:
            query = select(M).order_by(M.c.opened_at, M.c.meter_id)
            if newest is not None:
                query = select(M).order_by(M.c.opened_at.desc(), M.c.meter_id.desc())
                query = query.limit(v.positive(newest, "newest"))
            if account is not None:
                query = query.where(M.c.account_id == self._account_row(conn, account).id)
            if open_only:
                query = query.where(M.c.closed_at.is_(None))
            if late_only:
                query = query.where(M.c.late_records > 0)
            rows = conn.execute(query).all()
            names = self._names(conn, {r.account_id for r in rows})
        return [_meter(r, names[r.account_id]) for r in rows]

    def gpus_seen(self, pod_uid: str, *, since: datetime | None = None) -> list[str]:
        """UUIDs of the GPUs the agents reported for this pod (gpu_time usage whose owner
        is ``pod_uid``, ending after ``since`` if given), sorted. Rated usage is found
        through the pod's meters, unrated usage through the unrated index, so the query
        never scans other pods' usage."""
        v.text(pod_uid, "pod_uid")
        gpu = UsageKind.GPU_TIME.value
        conds = [U.c.kind == gpu, U.c.owner == pod_uid]
        if since is not None:
            conds.append(U.c.end_s > v.instant(since, "since").timestamp())
        pod_meters = select(M.c.meter_id).where(M.c.kind == gpu, M.c.subject == pod_uid)
        rated = select(U.c.subject).where(U.c.meter_id.in_(pod_meters), *conds)
        unrated = select(U.c.subject).where(U.c.rated_until < U.c.end_s, *conds)
        with self._read() as conn:
            subjects = conn.execute(rated.union(unrated)).scalars().all()
        return sorted(set(subjects))

    def _usage_for_meter(self, row: Row[Any], now_s: int) -> Any:
        """The unrated usage a meter may rate: same kind and owner, overlapping its window,
        ended by ``now``."""
        opened = schema.to_us(row.opened_at) // 1_000_000
        cond = [
            U.c.rated_until < U.c.end_s,
            U.c.kind == row.kind,
            U.c.owner == row.subject,
            U.c.end_s > opened,
            U.c.end_s <= now_s,
        ]
        if row.closed_at is not None:
            cond.append(U.c.rated_until < schema.to_us(row.closed_at) // 1_000_000)
        return and_(*cond)

    def rate_pending(self, now: datetime) -> int:
        """Rate unrated usage (ending at or before ``now``) that falls in a meter's open
        interval (clipped to it); post per meter the delta of the rounded cumulative
        charge (key ``meter:{meter_id}:{seq}``) in the same transaction that marks the
        usage rated. Returns the number of usage records rated."""
        v.instant(now, "now")
        now_s = schema.to_us(now) // 1_000_000
        with self._read() as conn:
            pending = (
                select(U.c.id)
                .where(
                    U.c.rated_until < U.c.end_s,
                    U.c.kind == M.c.kind,
                    U.c.owner == M.c.subject,
                    U.c.end_s <= now_s,
                )
                .exists()
            )
            meter_ids = (
                conn.execute(select(M.c.meter_id).where(pending).order_by(M.c.opened_at))
                .scalars()
                .all()
            )
        # Several meters per transaction (fewer commits), up to about _RATE_CHUNK rows; a
        # meter with a backlog stays at the head of the queue until it is drained.
        queue, rated = deque(meter_ids), 0
        while queue:
            with self.engine.begin() as conn:
                ingest.lock_usage(conn)  # PostgreSQL: no usage row appears mid-pass
                in_tx = 0
                while queue and in_tx < _RATE_CHUNK:
                    n = self._rate_meter(conn, queue[0], now, now_s)
                    if n < _RATE_CHUNK:
                        queue.popleft()
                    in_tx += n
            rated += in_tx
        return rated

    def _rate_meter(self, conn: Connection, meter_id: str, now: datetime, now_s: int) -> int:
        """Sum the meter's pending usage in SQL, post the delta of the rounded cumulative
        charge, mark exactly those rows rated (inside the caller's transaction, which
        holds the usage lock)."""
        row = self._meter_row(conn, meter_id, lock=True)
        opened = schema.to_us(row.opened_at) // 1_000_000
        closed = None if row.closed_at is None else schema.to_us(row.closed_at) // 1_000_000
        window = (opened, closed)
        # Only what the meter may be charged for: usage stored before it opened was not
        # checked at ingestion (gpucloud.ledger.admission); the rest stays unrated.
        cond, params = rating.pending_condition(row.kind, row.subject, window, now_s)
        terms = admission.terms_sql(admission.bind_pending(conn, row, cond, params))
        pending = rating.pending_usage(
            conn, row.kind, row.subject, window, now_s, _RATE_CHUNK, terms
        )
        if pending.count == 0:
            return 0
        self._charge(conn, row, pending.quantity, pending.last_end, now, pending.count)
        rating.mark_rated(conn, pending, meter_id, closed, schema.to_us(now))
        return pending.count

    def _charge(
        self,
        conn: Connection,
        row: Row[Any],
        quantity: int,
        last_end: int,
        now: datetime,
        records: int,
    ) -> None:
        """Add ``quantity`` (of ``records`` usage rows) to the meter (its row locked by
        the caller) and post the delta of its rounded cumulative charge, key
        ``meter:{meter_id}:{seq}``. A settled meter charges nothing: the run was billed
        for good, so the usage is only counted as late."""
        if row.settled_at is not None:
            conn.execute(
                update(M)
                .where(M.c.meter_id == row.meter_id)
                .values(
                    late_quantity=str(int(row.late_quantity) + quantity),
                    late_records=M.c.late_records + records,
                )
            )
            return
        acct = conn.execute(_LOCK_ACCOUNT, {"acct_id": row.account_id}).one()
        meter = _meter(row, acct.name)
        cumulative = meter.quantity_rated + quantity
        delta = next_posting(
            rating.exact_cost(cumulative, meter), meter.posted_minor, acct.currency
        )
        seq = meter.seq
        if delta:
            seq += 1
            self._post(
                conn,
                acct,
                EntryKind.CHARGE,
                -delta,
                f"meter:{meter.meter_id}:{seq}",
                meter.resource,
                f"{meter.kind.value} {meter.subject}",
                now,
                {"meter_id": meter.meter_id, "seq": seq, "quantity": str(cumulative)},
            )
        conn.execute(
            _SET_METER,
            {
                "mid": meter.meter_id,
                "q": str(cumulative),
                "posted": meter.posted_minor + delta,
                "s": seq,
                "last": max(row.last_usage_end or 0, last_end),
            },
        )

    def unposted(self, account: str, now: datetime) -> Unposted:
        """What the account's GPU runs owe beyond their postings, minor units >= 0:

        * an open meter: its ingested-but-unrated usage plus ``gpus`` x the time from the
          end of its last usage (or opened_at) to ``now``;
        * a closed meter not settled yet (a stopped run in its metering grace period):
          what its settlement will post, ``gpus`` x its whole window or the usage the
          agents reported, whichever is more (``settle_meter``'s rule).

        Each meter is rounded once (the delta of its rounded cumulative total). Without
        the second part a stopped run was invisible to the one-hour rule and to arrears
        for the whole grace period."""
        v.instant(now, "now")
        now_s = schema.to_us(now) // 1_000_000
        open_minor = closed_minor = 0
        with self._read() as conn:
            acct = self._account_row(conn, account)
            rows = conn.execute(
                select(M).where(
                    M.c.account_id == acct.id,
                    M.c.kind == MeterKind.GPU_TIME.value,
                    M.c.settled_at.is_(None),
                )
            ).all()
            # one query for every meter's unrated usage (an admission check runs this for
            # accounts with many running instances; one query per meter was the cost)
            by_owner: defaultdict[str, list[Row[Any]]] = defaultdict(list)
            if rows:
                for u in conn.execute(
                    select(
                        U.c.owner, U.c.kind, U.c.rated_until, U.c.end_s, U.c.quantity, U.c.node
                    ).where(
                        U.c.kind == MeterKind.GPU_TIME.value,
                        U.c.owner.in_({row.subject for row in rows}),
                        U.c.rated_until < U.c.end_s,
                    )
                ):
                    by_owner[u.owner].append(u)
            for row in rows:
                meter = _meter(row, account)
                window = rating.meter_window(meter)
                unrated = [
                    (u.kind, u.rated_until, u.end_s, u.quantity)
                    for u in by_owner[row.subject]
                    if u.end_s > window[0]
                    and (window[1] is None or u.rated_until < window[1])
                    and (row.node is None or u.node == row.node)
                ]
                quantity = meter.quantity_rated + rating.sum_clipped(unrated, window)
                if window[1] is None:
                    ends = [e for _, _, e, _ in unrated]
                    last = max([window[0], row.last_usage_end or window[0], *ends])
                    quantity += meter.gpus * max(0, now_s - last)
                else:
                    assert meter.closed_at is not None
                    held = meter.gpus * elapsed_seconds(meter.opened_at, meter.closed_at)
                    quantity = max(quantity, held)
                estimate = rating.rounded_cost(quantity, meter, acct.currency)
                owed = max(0, estimate - meter.posted_minor)
                if window[1] is None:
                    open_minor += owed
                else:
                    closed_minor += owed
        return Unposted(open_minor, closed_minor)

    def accrued_unsettled(self, account: str, now: datetime) -> int:
        """Everything the account's GPU runs owe beyond their postings (``unposted``)."""
        return self.unposted(account, now).total_minor

    def available_balance(self, account: str, now: datetime, reserved_minor: int = 0) -> int:
        """What the one-hour start rule checks (``gpucloud.billing.available_balance``):
        the balance minus what open meters accrued, what closed but unsettled runs owe,
        and ``reserved_minor`` (amounts the caller has committed but not charged yet:
        admitted package terms, renewals due)."""
        unposted = self.unposted(account, now)
        return available_balance(
            self.balance(account),
            accrued_minor=[unposted.open_minor],
            owed_minor=[unposted.closed_minor],
            reserved_minor=[reserved_minor],
        )

    # -- recharge: online orders ------------------------------------------------------
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
        now = self.clock.now()
        with self.engine.begin() as conn:
            acct = self._account_row(conn, account, lock=True)
            if client_ref is not None:
                row = conn.execute(
                    select(ORD).where(ORD.c.account_id == acct.id, ORD.c.client_ref == client_ref)
                ).first()
                if row is not None:
                    if (row.amount_minor, row.provider) != (amount, provider):
                        raise IdempotencyConflict(
                            f"order:{client_ref}", "order exists with other terms"
                        )
                    return _order(row, account)
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
            self._audit(conn, acct.id, actor, "order.created", order_id, detail, now)
            row = conn.execute(select(ORD).where(ORD.c.order_id == order_id)).one()
        return _order(row, account)

    def find_order(self, account: str, client_ref: str) -> Order | None:
        """The account's order with this client reference, if any."""
        with self._read() as conn:
            acct = self._account_row(conn, account)
            row = conn.execute(
                select(ORD).where(ORD.c.account_id == acct.id, ORD.c.client_ref == client_ref)
            ).first()
        return None if row is None else _order(row, account)

    def get_order(self, order_id: str) -> Order:
        with self._read() as conn:
            row = self._order_row(conn, order_id)
            name = self._names(conn, {row.account_id})[row.account_id]
        return _order(row, name)

    def _order_row(self, conn: Connection, order_id: str, *, lock: bool = False) -> Row[Any]:
        query = select(ORD).where(ORD.c.order_id == order_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"order {order_id!r} does not exist")
        return row

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
        with self.engine.begin() as conn:
            row = self._order_row(conn, order_id, lock=True)
            acct = conn.execute(select(A).where(A.c.id == row.account_id).with_for_update()).one()
            actor = f"provider:{row.provider}"
            if row.status == OrderStatus.PAID.value:
                if row.provider_txn == provider_txn and row.amount_minor == amount:
                    return _order(row, acct.name)
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
                self._audit(conn, acct.id, actor, "order.refused", order_id, detail, at)
            else:
                entry, _, _ = self._post(
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
                self._audit(conn, acct.id, actor, "order.paid", order_id, detail, at)
                row = self._order_row(conn, order_id)
        if refusal is not None:
            raise refusal  # after the commit, so the refusal stays in the audit trail
        return _order(row, acct.name)

    def expire_orders(self, now: datetime) -> list[str]:
        """Mark pending orders whose expires_at <= now expired; returns their ids."""
        v.instant(now, "now")
        with self.engine.begin() as conn:
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
                self._audit(conn, account_id, "system", "order.expired", order_id, {}, now)
        return [r.order_id for r in rows]

    # -- recharge: bank-transfer vouchers ---------------------------------------------
    def submit_voucher(
        self,
        account: str,
        amount_minor: int,
        payer: str,
        bank: str,
        transfer_no: str,
        file_sha256: str,
        at: datetime,
        *,
        submitter: str | None = None,
    ) -> Voucher:
        """A bank-transfer voucher pending review. The seed has the payer upload the
        voucher: ``file_sha256`` (the uploaded file's SHA-256) is required, and it is
        what the reviewer checks. (bank, transfer_no) is unique per account: the same
        submission again returns the voucher; other content raises IdempotencyConflict
        (naming nothing of any other account: another account's voucher for the same
        transfer is a voucher of its own, and approval credits a transfer once).
        ``submitter``: who submitted it (the audit trail's actor; they may never review
        it)."""
        amount = v.positive(amount_minor, "amount_minor")
        v.text(payer, "payer")
        v.text(bank, "bank")
        v.text(transfer_no, "transfer_no", max_len=128)
        if file_sha256 is None:
            raise InvalidInput(
                "file_sha256: a bank transfer needs its voucher (the SHA-256 of the uploaded "
                "transfer receipt); the seed has the payer upload it for review"
            )
        v.sha256_hex(file_sha256, "file_sha256")
        v.instant(at, "at")
        submitter = v.text(submitter, "submitter") if submitter is not None else None
        with self.engine.begin() as conn:
            acct = self._account_row(conn, account, lock=True)
            row = conn.execute(
                select(VO).where(
                    VO.c.account_id == acct.id, VO.c.bank == bank, VO.c.transfer_no == transfer_no
                )
            ).first()
            if row is not None:
                if (row.amount_minor, row.payer) != (amount, payer):
                    raise IdempotencyConflict(
                        f"voucher:{bank}:{transfer_no}",
                        f"transfer {transfer_no!r} at {bank!r} was already submitted as voucher "
                        f"{row.voucher_id!r} with other details",
                    )
                return _voucher(row, account)
            voucher_id = uuid.uuid4().hex
            conn.execute(
                insert(VO).values(
                    voucher_id=voucher_id,
                    account_id=acct.id,
                    amount_minor=amount,
                    payer=payer,
                    bank=bank,
                    transfer_no=transfer_no,
                    file_sha256=file_sha256,
                    status=VoucherStatus.PENDING.value,
                    submitted_at=at,
                    submitter=submitter,
                )
            )
            detail = {
                "amount_minor": amount,
                "bank": bank,
                "transfer_no": transfer_no,
                "file_sha256": file_sha256,
            }
            actor = submitter or f"user:{account}"
            self._audit(conn, acct.id, actor, "voucher.submitted", voucher_id, detail, at)
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()
        return _voucher(row, account)

    def get_voucher(self, voucher_id: str) -> Voucher:
        with self._read() as conn:
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).first()
            if row is None:
                raise NotFound(f"voucher {voucher_id!r} does not exist")
            name = self._names(conn, {row.account_id})[row.account_id]
        return _voucher(row, name)

    def vouchers(self, *, status: str | None = None, account: str | None = None) -> list[Voucher]:
        with self._read() as conn:
            query = select(VO).order_by(VO.c.submitted_at, VO.c.voucher_id)
            if status is not None:
                query = query.where(VO.c.status == v.choice(status, VoucherStatus, "status").value)
            if account is not None:
                query = query.where(VO.c.account_id == self._account_row(conn, account).id)
            rows = conn.execute(query).all()
            names = self._names(conn, {r.account_id for r in rows})
        return [_voucher(r, names[r.account_id]) for r in rows]

    def review_voucher(
        self,
        voucher_id: str,
        approve: bool,
        reviewer: str,
        reason: str,
        at: datetime,
        *,
        expect_amount: int | None = None,
    ) -> Voucher:
        """Approve (credits exactly once, key ``voucher:{voucher_id}``) or reject (needs
        a non-empty reason). ReviewRefused: a second review (``already_reviewed``), the
        voucher's submitter reviewing it (``own_voucher``), an approval of a transfer
        already credited to any account (``transfer_credited``), or ``expect_amount``
        (what the reviewer saw) other than the voucher's (``amount_mismatch``). Every
        refusal is in the audit trail."""
        if not isinstance(approve, bool):
            raise InvalidInput(f"approve: must be a bool, got {type(approve).__name__}")
        v.text(reviewer, "reviewer")
        v.text(reason, "reason", max_len=4000, empty=approve)
        v.instant(at, "at")
        refusal: ReviewRefused | None = None
        with self.engine.begin() as conn:
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).first()
            if row is None:
                raise NotFound(f"voucher {voucher_id!r} does not exist")
            # Every voucher of the same transfer, in one order (this one among them): two
            # approvals of one transfer in two accounts run one after the other.
            conn.execute(
                select(VO.c.voucher_id)
                .where(VO.c.bank == row.bank, VO.c.transfer_no == row.transfer_no)
                .order_by(VO.c.voucher_id)
                .with_for_update()
            ).all()
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()
            if row.status != VoucherStatus.PENDING.value:
                raise ReviewRefused(
                    voucher_id,
                    "already_reviewed",
                    f"{row.status} by {row.reviewer} at {row.reviewed_at.isoformat()}",
                )
            if approve and not row.file_sha256:
                raise ReviewRefused(
                    voucher_id,
                    "no_voucher_file",
                    "the voucher has no uploaded file to check (submitted before vouchers "
                    "were required); reject it and ask the payer to submit it with the file",
                )
            acct = conn.execute(select(A).where(A.c.id == row.account_id).with_for_update()).one()
            refusal = self._review_refusal(conn, row, approve, reviewer, expect_amount)
            if refusal is not None:
                detail = {"reason": refusal.reason, "amount_minor": row.amount_minor}
                self._audit(conn, acct.id, reviewer, "voucher.review_refused", voucher_id,
                            detail, at)  # fmt: skip
            else:
                row = self._apply_review(conn, row, acct, approve, reviewer, reason, at)
        if refusal is not None:
            raise refusal  # after the commit, so the refusal stays in the audit trail
        return _voucher(row, acct.name)

    def _apply_review(
        self,
        conn: Connection,
        row: Row[Any],
        acct: Row[Any],
        approve: bool,
        reviewer: str,
        reason: str,
        at: datetime,
    ) -> Row[Any]:
        voucher_id = row.voucher_id
        entry_id = None
        if approve:
            entry, _, _ = self._post(
                conn,
                acct,
                EntryKind.RECHARGE,
                row.amount_minor,
                f"voucher:{voucher_id}",
                None,
                f"bank transfer {row.transfer_no} from {row.payer}",
                at,
                {"voucher_id": voucher_id, "reviewer": reviewer},
            )
            entry_id = entry.id
        status = VoucherStatus.APPROVED if approve else VoucherStatus.REJECTED
        conn.execute(
            update(VO)
            .where(VO.c.voucher_id == voucher_id)
            .values(
                status=status.value,
                reviewer=reviewer,
                reason=reason,
                reviewed_at=at,
                entry_id=entry_id,
            )
        )
        detail = {
            "reason": reason,
            "amount_minor": row.amount_minor,
            "file_sha256": row.file_sha256,  # what the reviewer saw
        }
        self._audit(conn, acct.id, reviewer, f"voucher.{status.value}", voucher_id, detail, at)
        return conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()

    def _review_refusal(
        self,
        conn: Connection,
        row: Row[Any],
        approve: bool,
        reviewer: str,
        expect_amount: int | None,
    ) -> ReviewRefused | None:
        if row.submitter is not None and row.submitter == reviewer:
            return ReviewRefused(
                row.voucher_id, "own_voucher", f"{reviewer!r} submitted it: another must review"
            )
        if expect_amount is not None and expect_amount != row.amount_minor:
            return ReviewRefused(
                row.voucher_id,
                "amount_mismatch",
                f"the review is for {expect_amount}, the voucher is for {row.amount_minor}",
            )
        if approve:
            credited = conn.execute(
                select(VO.c.voucher_id).where(
                    VO.c.bank == row.bank,
                    VO.c.transfer_no == row.transfer_no,
                    VO.c.status == VoucherStatus.APPROVED.value,
                )
            ).first()
            if credited is not None:
                return ReviewRefused(
                    row.voucher_id,
                    "transfer_credited",
                    f"transfer {row.transfer_no!r} at {row.bank!r} was already credited "
                    f"(voucher {credited[0]!r})",
                )
        return None

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
        with self.engine.begin() as conn:
            acct = self._account_row(conn, account)
            self._audit(conn, acct.id, actor, action, subject, dict(detail), at)

    def audit_events(self, account: str | None = None, *, limit: int = 1000) -> list[AuditEvent]:
        """Who did what when (orders, vouchers, manual entries), oldest first."""
        with self._read() as conn:
            query = select(AU).order_by(AU.c.id).limit(limit)
            if account is not None:
                query = query.where(AU.c.account_id == self._account_row(conn, account).id)
            rows = conn.execute(query).all()
            names = self._names(conn, {r.account_id for r in rows if r.account_id is not None})
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
