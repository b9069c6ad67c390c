"""Usage ingestion: one transaction per batch, one range query per subject, one bulk insert.

No two stored records of one subject overlap (an invariant kept here), so a candidate
need only be checked against its neighbours in start order: the nearest stored or
accepted interval starting before it and the nearest starting after it.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, and_, select, text

from gpucloud.ledger import schema
from gpucloud.ledger.types import IngestResult
from gpucloud.usage import MAX_GPU_WINDOW_S, UsageKind, UsageRecord

# Arbitrary constant: PostgreSQL ingest transactions take this advisory lock so two
# concurrent batches cannot both pass the overlap check for the same GPU.
_INGEST_LOCK = 0x6770_7563_6C64_0002
_GPU = UsageKind.GPU_TIME.value

COLUMNS = (
    "kind",
    "subject",
    "start_s",
    "end_s",
    "quantity",
    "measure",
    "owner",
    "node",
    "namespace",
    "pod_name",
    "gpu_product",
    "digest",
    "received_at",
    "rated_until",
)
_KIND, _SUBJECT, _START, _END, _DIGEST = 0, 1, 2, 3, 11


def digest(record: UsageRecord) -> str:
    """A fingerprint of the whole record: the same natural key with another digest is a
    conflicting re-send. Built from the fields directly (JSON dumping every record costs
    more than the insert); a test pins that every field of UsageRecord is covered."""
    return _row(record, 0)[_DIGEST]  # type: ignore[return-value]


def _row(r: UsageRecord, received_us: int) -> tuple[object, ...]:
    """The record as a row of COLUMNS."""
    kind = r.kind.value
    gpu, pod = r.gpu, r.pod
    subject = gpu.uuid if gpu is not None else str(r.volume)
    content = (kind, r.node, r.start, r.end, r.quantity, subject,
               gpu.product if gpu else None, pod.namespace if pod else None,
               pod.name if pod else None, pod.uid if pod else None, r.volume)  # fmt: skip
    return (
        kind,
        subject,
        r.start,
        r.end,
        r.quantity,
        r.quantity if kind == _GPU else r.quantity * (r.end - r.start),
        pod.uid if kind == _GPU and pod is not None else str(r.volume),
        r.node,
        pod.namespace if pod else None,
        pod.name if pod else None,
        gpu.product if gpu else None,
        hashlib.blake2b(repr(content).encode(), digest_size=16).hexdigest(),
        received_us,
        r.start,  # rated_until: nothing rated yet
    )


def _insert(conn: Connection, rows: list[tuple[object, ...]]) -> None:
    # Driver-level bulk insert: SQLAlchemy's per-row parameter processing would cost
    # more than the database's insert itself for batches of thousands of records.
    table, cols = schema.usage.name, ", ".join(COLUMNS)
    if conn.dialect.name == "postgresql":
        dbapi = conn.connection.driver_connection
        assert dbapi is not None
        with dbapi.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" * len(COLUMNS))
    conn.exec_driver_sql(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)


def _stored(conn: Connection, kind: str, subject: str, lo: int, hi: int) -> list[tuple]:  # type: ignore[type-arg]
    """(start, end, digest) of stored records of the subject that may touch [lo, hi)."""
    t = schema.usage
    where = [t.c.kind == kind, t.c.subject == subject, t.c.start_s < hi]
    if kind == _GPU:  # windows are short: a bounded index range
        where.append(t.c.start_s > lo - MAX_GPU_WINDOW_S)
    else:
        where.append(t.c.end_s > lo)
    query = select(t.c.start_s, t.c.end_s, t.c.digest).where(and_(*where))
    return [tuple(r) for r in conn.execute(query.order_by(t.c.start_s))]


def ingest(conn: Connection, records: Sequence[UsageRecord], received_at: datetime) -> IngestResult:
    received_us = schema.to_us(received_at)
    rejected: list[tuple[int, str]] = []
    groups: dict[tuple[str, str], list[tuple[int, int, tuple[object, ...]]]] = {}
    for index, record in enumerate(records):
        if not isinstance(record, UsageRecord):
            rejected.append((index, f"not a UsageRecord: {type(record).__name__}"))
            continue
        row = _row(record, received_us)
        key = (row[_KIND], row[_SUBJECT])
        groups.setdefault(key, []).append((record.start, index, row))  # type: ignore[arg-type]

    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INGEST_LOCK})

    duplicates = 0
    accepted: list[tuple[object, ...]] = []
    for (kind, subject), cands in groups.items():
        cands.sort()
        lo = cands[0][0]
        hi = max(row[_END] for _, _, row in cands)  # type: ignore[type-var]
        stored = _stored(conn, kind, subject, lo, hi)  # type: ignore[arg-type]
        starts = [s for s, _, _ in stored]
        ends = [e for _, e, _ in stored]
        digests = [d for _, _, d in stored]
        for start, index, row in cands:
            end = row[_END]
            pos = bisect_left(starts, start)
            natural = f"{kind}:{subject}:{start}"
            if pos < len(starts) and starts[pos] == start:
                if digests[pos] == row[_DIGEST]:
                    duplicates += 1
                else:
                    rejected.append((index, f"{natural}: already ingested with other content"))
                continue
            clash = None
            if pos > 0 and ends[pos - 1] > start:
                clash = pos - 1
            elif pos < len(starts) and starts[pos] < end:  # type: ignore[operator]
                clash = pos
            if clash is not None:
                rejected.append(
                    (
                        index,
                        f"{natural}: overlaps [{starts[clash]}, {ends[clash]}) of the "
                        f"same {kind} subject",
                    )
                )
                continue
            starts.insert(pos, start)
            ends.insert(pos, end)
            digests.insert(pos, row[_DIGEST])
            accepted.append(row)

    if accepted:
        _insert(conn, accepted)
    rejected.sort()
    return IngestResult(accepted=len(accepted), duplicates=duplicates, rejected=rejected)
