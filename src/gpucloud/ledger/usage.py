"""Usage: ingesting agents' usage records, and reading usage.

``ingest_usage`` stores a batch in one transaction (gpucloud.ledger.ingest: idempotent
on each record's natural key, no two records of one subject overlap). In the same
transaction it locks the batch's meters, refuses what they may not be charged for
(gpucloud.ledger.admission: ``_admit``), and with ``rate_at`` rates the records that lie
wholly inside one meter's window (``_rate_new``, through ``Meters.charge``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, select

from gpucloud.ledger import admission, ingest, schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.entries import BATCH
from gpucloud.ledger.meters import Meters
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import GpuActivity, IngestResult, UnratedUsage, UsageSummaryRow
from gpucloud.ledger.wire import WireBatch
from gpucloud.usage import UsageKind, UsageRecord

U, M = schema.usage, schema.meters

_LOCK_METERS_OF = (
    select(M)
    .where(
        M.c.kind.in_(bindparam("kinds", expanding=True)),
        M.c.subject.in_(bindparam("owners", expanding=True)),
    )
    .order_by(M.c.opened_at)
    .with_for_update()
)


def _gpus_of_pods() -> Any:
    """The batch read of ``gpus_seen_by_pod``, built once (expanding IN parameters)."""
    pods, gpu = bindparam("pods", expanding=True), bindparam("gpu")
    conds = [U.c.kind == gpu, U.c.owner.in_(pods)]
    pod_meters = select(M.c.meter_id).where(M.c.kind == gpu, M.c.subject.in_(pods))
    rated = select(U.c.owner, U.c.subject).where(U.c.meter_id.in_(pod_meters), *conds)
    unrated = select(U.c.owner, U.c.subject).where(U.c.rated_until < U.c.end_s, *conds)
    return rated.union(unrated)


_GPUS_OF_PODS = _gpus_of_pods()


class Usage:
    """Ingesting usage (with admission and rating on arrival) and reading it."""

    def __init__(self, store: Store, meters: Meters) -> None:
        self._s = store
        self._meters = meters

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
        return self.ingest_batches([records], received_at=received_at, rate_at=rate_at)[0]

    def ingest_batches(
        self,
        batches: Sequence[Sequence[UsageRecord] | WireBatch],
        *,
        received_at: datetime,
        rate_at: datetime | None = None,
    ) -> list[IngestResult]:
        """``ingest_usage`` of each batch in turn, all in one transaction (group commit:
        one commit, one fsync, for the batches of several requests). Each result is what
        the batch alone would have got after the ones before it; if the transaction
        fails, none of them is stored."""
        v.instant(received_at, "received_at")
        if rate_at is not None:
            v.instant(rate_at, "rate_at")
        if not any(batches):
            return [IngestResult(0, 0, []) for _ in batches]
        with self._s.engine.begin() as conn:
            ingest.lock_usage(conn)  # once for the group (a round trip on PostgreSQL)
            return [self._ingest_in(conn, b, received_at, rate_at) for b in batches]

    def _ingest_in(
        self,
        conn: Connection,
        records: Sequence[UsageRecord] | WireBatch,
        received_at: datetime,
        rate_at: datetime | None,
    ) -> IngestResult:
        if not records:
            return IngestResult(0, 0, [])
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
        admission): another node's, a GPU beyond the pod's count, another product or kind of
        device than the meter's, more bytes than the
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
                r[at_.START], r[at_.END], r[at_.QUANTITY], r[at_.PRODUCT],
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
                self._s.audit(conn, account_id, actor, "usage.refused", meter_id, detail, at)
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
            self._meters.charge(conn, m, quantity, last_end, now, len(indexes))
            for i in indexes:
                row = rows[i]
                rated_cols = (row[ingest.END], meter_id, rated_at)
                out[i] = (*row[: ingest.RATED.start], *rated_cols, *row[ingest.RATED.stop :])
        return out

    def unrated_usage(self, *, limit: int = 1000) -> list[UnratedUsage]:
        """Usage no meter has rated: no meter for its subject, or outside every
        meter's open interval. Never charged to anyone; listed for operators."""
        with self._s.read() as conn:
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
        with self._s.read() as conn:
            if account is not None:
                query = query.where(M.c.account_id == self._s.account_row(conn, account).id)
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
        with self._s.read() as conn:
            subjects = conn.execute(rated.union(unrated)).scalars().all()
        return sorted(set(subjects))

    def gpus_seen_by_pod(self, pod_uids: Iterable[str]) -> dict[str, list[str]]:
        """``gpus_seen`` for many pods at once (one query per ``BATCH`` of them), by pod
        UID; a pod with no GPU reported is absent. Same two paths: rated usage through
        the pods' meters, unrated through the unrated index."""
        pods = sorted({v.text(p, "pod_uid") for p in pod_uids})
        found: dict[str, set[str]] = {}
        with self._s.read() as conn:
            for i in range(0, len(pods), BATCH):
                params = {"pods": pods[i : i + BATCH], "gpu": UsageKind.GPU_TIME.value}
                for owner, subject in conn.execute(_GPUS_OF_PODS, params).all():
                    found.setdefault(owner, set()).add(subject)
        return {pod: sorted(gpus) for pod, gpus in found.items()}

    def usage_watermark(self) -> int:
        """The newest usage record's id (0 for none): a reader that saw an answer at
        one watermark knows no record was stored since while it is unchanged (on
        PostgreSQL a record of a transaction still open may commit below it later)."""
        with self._s.read() as conn:
            return int(conn.execute(select(func.max(U.c.id))).scalar() or 0)

    def gpu_activity(self, meter_id: str, *, since_s: int) -> list[GpuActivity]:
        """What the GPUs of a run did: its meter's records ending after ``since_s``
        (POSIX seconds), oldest first, with their activity (None where the agent sent
        none). Only records rated by the meter count: admitted for that run, on its node
        (a node reports only for what it ran). Unrated ones join once rated."""
        v.text(meter_id, "meter_id")
        query = (
            select(U.c.subject, U.c.start_s, U.c.end_s, U.c.util_max, U.c.memory_max, U.c.samples)
            .where(U.c.meter_id == meter_id, U.c.end_s > int(since_s))
            .order_by(U.c.end_s)
        )
        with self._s.read() as conn:
            rows = conn.execute(query).all()
        return [GpuActivity(*row) for row in rows]
