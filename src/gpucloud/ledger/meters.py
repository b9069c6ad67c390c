"""Meters: what a subject's usage is charged at, and turning rated usage into charges.

A meter rates the usage of one subject (a pod's GPUs, a volume) for one account at one
price, over its window [opened_at, closed_at). ``charge`` adds rated quantity to the
meter and posts the delta of its rounded cumulative charge (key
``meter:{meter_id}:{seq}``) in the caller's transaction, which also marks the usage
rated: by ``rate_pending`` here, or by ``ingest_usage(rate_at=...)`` (usage.py) for
records rated as they arrive. ``settle_meter`` finalizes a closed meter in one
transaction (the GPU-seconds agents never reported are billed from control-plane
timestamps, key ``meter-fallback:{meter_id}``); usage arriving later is counted as late,
never charged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update

from gpucloud.billing.intervals import elapsed_seconds
from gpucloud.billing.money import next_posting
from gpucloud.ledger import admission, ingest, rating, schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.entries import BATCH, ENTRY_BY_KEY, LOCK_ACCOUNT, Entries
from gpucloud.ledger.errors import IdempotencyConflict, InvalidInput
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import EntryKind, Meter, MeterKind, MeterUnit

M, U = schema.meters, schema.usage
_METERS_BY_ID = select(M).where(M.c.meter_id.in_(bindparam("ids", expanding=True)))
_RATE_CHUNK = 20_000  # usage rows rated per transaction and meter

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


def meter_of(row: Row[Any], account: str) -> Meter:
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
        gpu_product=row.gpu_product,
    )


class Meters:
    """Opening, closing, rating and settling meters; reading them."""

    def __init__(self, store: Store, entries: Entries) -> None:
        self._s = store
        self._entries = entries

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
        gpu_product: str | None = None,
    ) -> Meter:
        """Start rating usage of ``subject`` (a pod UID for gpu_time, else a volume id)
        against ``account`` at ``unit_price`` per GPU-hour or per GiB-hour.

        Idempotent: the same meter_id with the same terms returns the meter (other terms
        raise IdempotencyConflict). One open meter per (kind, subject) at a time.

        What it may be charged for (gpucloud.ledger.admission): usage reported by
        ``node`` only (None: the node of the first report), for at most ``gpus`` GPU
        UUIDs (the first ones reported), and for a volume at most ``max_bytes`` bytes
        (its quota or capacity; None: no cap). ``gpus`` also drives accrual estimates.
        ``gpu_product`` (gpu_time): the product it is priced as; records of another
        product, or of another kind of device (MIG slice, time-sliced replica, whole GPU),
        are refused (None: any).
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
        if gpu_product is not None:
            if kind is not MeterKind.GPU_TIME:
                raise InvalidInput(f"gpu_product: only a gpu_time meter has one, not {kind.value}")
            v.text(gpu_product, "gpu_product")
        with self._s.engine.begin() as conn:
            acct = self._s.account_row(conn, account, lock=True)
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
                    and row.gpu_product == gpu_product
                )
                if not same:
                    raise IdempotencyConflict(f"meter:{meter_id}", "meter opened with other terms")
                return meter_of(row, account)
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
                    gpu_product=gpu_product,
                )
            )
            row = conn.execute(select(M).where(M.c.meter_id == meter_id)).one()
        return meter_of(row, account)

    def close_meter(self, meter_id: str, at: datetime) -> Meter:
        """Stop the meter at ``at``: usage after it is not rated by this meter.
        Idempotent (closing again keeps the first close time)."""
        v.instant(at, "at")
        with self._s.engine.begin() as conn:
            row = self.meter_row(conn, meter_id, lock=True)
            if row.closed_at is None:
                if at < row.opened_at:
                    raise InvalidInput(f"at: {at} is before the meter opened ({row.opened_at})")
                conn.execute(update(M).where(M.c.meter_id == meter_id).values(closed_at=at))
                row = self.meter_row(conn, meter_id)
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return meter_of(row, name)

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
        with self._s.engine.begin() as conn:
            ingest.lock_usage(conn)  # PostgreSQL: no usage is rated concurrently
            row = self.meter_row(conn, meter_id, lock=True)
            if row.settled_at is None:
                self._settle(conn, row, at, fallback, memo, dict(meta or {}))
                row = self.meter_row(conn, meter_id)
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return meter_of(row, name)

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
        row = self.meter_row(conn, meter_id)
        acct = conn.execute(LOCK_ACCOUNT, {"acct_id": row.account_id}).one()
        meter = meter_of(row, acct.name)
        held = row.gpus * elapsed_seconds(row.opened_at, row.closed_at)
        missing = held - meter.quantity_rated if fallback else 0
        amount = 0
        if missing > 0:
            key = f"meter-fallback:{meter_id}"
            existing = conn.execute(ENTRY_BY_KEY, {"key": key}).first()
            if existing is not None:  # posted before settlement existed: adopt it
                amount = -existing.amount_minor
            else:
                exact = rating.exact_cost(held, meter)
                amount = next_posting(exact, meter.posted_minor, acct.currency)
                if amount:
                    meta = {**meta, "meter_id": meter_id, "gpu_seconds": missing}
                    self._entries.post(
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

    def meter_row(self, conn: Connection, meter_id: str, *, lock: bool = False) -> Row[Any]:
        return self._s.row(conn, M.c.meter_id, meter_id, "meter", lock=lock)

    def get_meter(self, meter_id: str) -> Meter:
        with self._s.read() as conn:
            row = self.meter_row(conn, meter_id)
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return meter_of(row, name)

    def get_meters(self, meter_ids: Iterable[str]) -> dict[str, Meter]:
        """``get_meter`` for many at once (one query per ``BATCH``), by id; an unknown id
        is absent rather than NotFound."""
        ids = sorted(set(meter_ids))
        rows: list[Row[Any]] = []
        with self._s.read() as conn:
            for i in range(0, len(ids), BATCH):
                rows += conn.execute(_METERS_BY_ID, {"ids": ids[i : i + BATCH]}).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return {r.meter_id: meter_of(r, names[r.account_id]) for r in rows}

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
        with self._s.read() as conn:
            query = select(M).order_by(M.c.opened_at, M.c.meter_id)
            if newest is not None:
                query = select(M).order_by(M.c.opened_at.desc(), M.c.meter_id.desc())
                query = query.limit(v.positive(newest, "newest"))
            if account is not None:
                query = query.where(M.c.account_id == self._s.account_row(conn, account).id)
            if open_only:
                query = query.where(M.c.closed_at.is_(None))
            if late_only:
                query = query.where(M.c.late_records > 0)
            rows = conn.execute(query).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return [meter_of(r, names[r.account_id]) for r in rows]

    def rate_pending(self, now: datetime) -> int:
        """Rate unrated usage (ending at or before ``now``) that falls in a meter's open
        interval (clipped to it); post per meter the delta of the rounded cumulative
        charge (key ``meter:{meter_id}:{seq}``) in the same transaction that marks the
        usage rated. Returns the number of usage records rated."""
        v.instant(now, "now")
        now_s = schema.to_us(now) // 1_000_000
        with self._s.read() as conn:
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
            with self._s.engine.begin() as conn:
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
        row = self.meter_row(conn, meter_id, lock=True)
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
        self.charge(conn, row, pending.quantity, pending.last_end, now, pending.count)
        rating.mark_rated(conn, pending, meter_id, closed, schema.to_us(now))
        return pending.count

    def charge(
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
        acct = conn.execute(LOCK_ACCOUNT, {"acct_id": row.account_id}).one()
        meter = meter_of(row, acct.name)
        cumulative = meter.quantity_rated + quantity
        delta = next_posting(
            rating.exact_cost(cumulative, meter), meter.posted_minor, acct.currency
        )
        seq = meter.seq
        if delta:
            seq += 1
            self._entries.post(
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
