"""Usage ingestion: one transaction per batch, one range query per subject, one bulk insert.

No two stored records of one subject overlap (an invariant kept here), so a candidate
need only be checked against its neighbours in start order: the nearest stored or
accepted interval starting before it and the nearest starting after it.

This is the hot path of metering (thousands of records a second), so it talks to the
DB-API cursor directly: SQLAlchemy's statement building and per-row parameter
processing cost more than the database's own work for batches of small records.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from gpucloud.ledger import schema
from gpucloud.ledger.types import IngestResult
from gpucloud.ledger.wire import WireBatch, content_digest
from gpucloud.usage import MAX_GPU_WINDOW_S, UsageKind, UsageRecord

# Arbitrary constant: PostgreSQL transactions that write usage rows (ingestion, rating)
# take this advisory lock, so two batches cannot both pass the overlap check for the
# same GPU, and a rating pass sees no rows appear between its sum and its update.
_INGEST_LOCK = 0x6770_7563_6C64_0002
_GPU = UsageKind.GPU_TIME.value
# Subjects per neighbour query: a node's GPUs in one; bounded, as SQLite caps the
# SELECTs of a compound statement (500) and its parameters.
_SUBJECTS_PER_QUERY = 64

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
    "meter_id",
    "rated_at",
    # what the GPU did (UsageRecord.activity; NULL without it): idle-GPU detection only,
    # outside the digest (not billing data)
    "util_max",
    "memory_max",
    "samples",
)
# Positions in a row of COLUMNS.
KIND, SUBJECT, START, END, QUANTITY, MEASURE, OWNER, NODE, PRODUCT, DIGEST = (
    0, 1, 2, 3, 4, 5, 6, 7, 10, 11,
)  # fmt: skip
RATED = slice(13, 16)  # rated_until, meter_id, rated_at

Row = tuple[Any, ...]
# Rates accepted rows inside the ingest transaction: returns them with RATED filled in
# for those it rated (see Ledger.ingest_usage's rate_at).
Rater = Callable[[list[Row]], list[Row]]
# Admits (index, row) pairs before the overlap check: returns those it keeps, and adds
# (index, reason) of the others to the list and their rule to the dict (ledger.admission).
Indexed = list[tuple[int, Row]]
Guard = Callable[[Indexed, list[tuple[int, str]], dict[int, str]], Indexed]


def digest(record: UsageRecord) -> str:
    """A fingerprint of the whole record: the same natural key with another digest is a
    conflicting re-send. Built from the fields directly (JSON dumping every record costs
    more than the insert); a test pins that every field of UsageRecord is covered."""
    return _row(record, 0)[DIGEST]  # type: ignore[return-value]


def _row(r: UsageRecord, received_us: int) -> Row:
    """The record as a row of COLUMNS."""
    kind = r.kind.value
    gpu, pod, start, end, quantity, volume = r.gpu, r.pod, r.start, r.end, r.quantity, r.volume
    if pod is not None:
        namespace, pod_name, uid = pod.namespace, pod.name, pod.uid
    else:
        namespace = pod_name = uid = None
    if gpu is not None:
        subject, product = gpu.uuid, gpu.product
    else:
        subject, product = str(volume), None
    # The digest's input is fixed (stored digests of earlier versions must still match).
    content = (kind, r.node, start, end, quantity, subject, product, namespace, pod_name, uid,
               volume)  # fmt: skip
    if kind == _GPU:
        measure, owner = quantity, (uid if pod is not None else str(volume))
    else:
        measure, owner = quantity * (end - start), str(volume)
    return (
        kind,
        subject,
        start,
        end,
        quantity,
        measure,
        owner,
        r.node,
        namespace,
        pod_name,
        product,
        content_digest(content),
        received_us,
        start,  # rated_until: nothing rated yet
        None,  # meter_id
        None,  # rated_at
        *_activity(r.activity.model_dump() if r.activity is not None else None),
    )


def _activity(a: dict[str, int] | None) -> tuple[int | None, int | None, int | None]:
    if a is None:
        return (None, None, None)
    return (a["util_max_percent"], a["memory_max_bytes"], a["samples"])


def _wire_row(r: dict[str, Any], digest: str, received_us: int) -> Row:
    """_row of a record of a WireBatch (the same row; its digest computed by the batch)."""
    kind, node, start, end, quantity = r["kind"], r["node"], r["start"], r["end"], r["quantity"]
    gpu, pod, volume = r.get("gpu"), r.get("pod"), r.get("volume")
    if pod is not None:
        namespace, pod_name, uid = pod["namespace"], pod["name"], pod["uid"]
    else:
        namespace = pod_name = uid = None
    if gpu is not None:
        subject, product = gpu["uuid"], gpu["product"]
    else:
        subject, product = str(volume), None
    if kind == _GPU:
        measure, owner = quantity, (uid if pod is not None else str(volume))
    else:
        measure, owner = quantity * (end - start), str(volume)
    return (kind, subject, start, end, quantity, measure, owner, node, namespace, pod_name,
            product, digest, received_us, start, None, None,
            *_activity(r.get("activity")))  # fmt: skip


def _rows(
    records: Sequence[UsageRecord] | WireBatch, received_us: int, rejected: list[tuple[int, str]]
) -> list[tuple[int, Row]]:
    """(index, row) of each record; anything that is not a record goes to ``rejected``."""
    if isinstance(records, WireBatch):
        rows = zip(records.records, records.digests, strict=True)
        return [(i, _wire_row(r, d, received_us)) for i, (r, d) in enumerate(rows)]
    out = []
    for index, record in enumerate(records):
        if isinstance(record, UsageRecord):
            out.append((index, _row(record, received_us)))
        else:
            rejected.append((index, f"not a UsageRecord: {type(record).__name__}"))
    return out


def _marks(conn: Connection, n: int) -> str:
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    return ", ".join([mark] * n)


def _cursor(conn: Connection) -> Any:
    dbapi = conn.connection.driver_connection
    assert dbapi is not None
    return dbapi.cursor()


def lock_usage(conn: Connection) -> None:
    """On PostgreSQL, serialise the transactions that write usage rows (a no-op on
    SQLite, whose writers are serialised by BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_INGEST_LOCK,))


def _insert(conn: Connection, rows: list[Row]) -> None:
    table, cols = schema.usage.name, ", ".join(COLUMNS)
    cur = _cursor(conn)
    try:
        if conn.dialect.name == "postgresql":
            with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cur.executemany(
                f"INSERT INTO {table} ({cols}) VALUES ({_marks(conn, len(COLUMNS))})", rows
            )
    finally:
        cur.close()


def _neighbour_sql(conn: Connection, kind: str, subjects: int) -> str:
    """(subject, start, end, digest) of stored records of ``subjects`` subjects of one kind
    that may touch each one's [lo, hi): one statement for a batch's subjects, as each
    statement is a round trip on PostgreSQL, paid with the write lock held."""
    m = "%s" if conn.dialect.name == "postgresql" else "?"
    # GPU windows are short: a bounded range of the natural-key index. Other records
    # may be long: the one that starts before lo may end after it. One SELECT per
    # subject, each with the subject as an equality of the index (with IN (...) or OR'd
    # ranges, PostgreSQL factored out the range and scanned every subject's rows).
    lower = "start_s" if kind == _GPU else "end_s"
    one = (
        f"SELECT subject, start_s, end_s, digest FROM {schema.usage.name} "
        f"WHERE kind = {m} AND subject = {m} AND start_s < {m} AND {lower} > {m}"
    )
    return " UNION ALL ".join([one] * subjects) + " ORDER BY 1, 2"


def _stored(
    cur: Any, conn: Connection, kind: str, bounds: list[tuple[str, int, int]]
) -> dict[str, list[tuple[int, int, str]]]:
    """subject -> its stored (start, end, digest) in start order, for each (subject, lo,
    hi) of one kind: the records that may overlap the batch's candidates."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for first in range(0, len(bounds), _SUBJECTS_PER_QUERY):
        chunk = bounds[first : first + _SUBJECTS_PER_QUERY]
        params: list[Any] = []
        for subject, lo, hi in chunk:
            params += (kind, subject, hi, lo - MAX_GPU_WINDOW_S if kind == _GPU else lo)
        cur.execute(_neighbour_sql(conn, kind, len(chunk)), params)
        for subject, start, end, dig in cur.fetchall():
            out.setdefault(subject, []).append((start, end, dig))
    return out


def ingest(
    conn: Connection,
    records: Sequence[UsageRecord] | WireBatch,
    received_at: datetime,
    rater: Rater | None = None,
    guard: Guard | None = None,
) -> IngestResult:
    """Store a batch in the caller's transaction, which holds ``lock_usage``."""
    rejected: list[tuple[int, str]] = []
    rules: dict[int, str] = {}
    indexed = _rows(records, schema.to_us(received_at), rejected)
    if guard is not None:
        indexed = guard(indexed, rejected, rules)
    groups: dict[tuple[str, str], list[tuple[int, int, Row]]] = {}
    for index, row in indexed:
        key = (row[KIND], row[SUBJECT])
        group = groups.get(key)  # type: ignore[call-overload]
        if group is None:
            groups[key] = group = []  # type: ignore[index]
        group.append((row[START], index, row))  # type: ignore[arg-type]

    duplicates = 0
    accepted: list[Row] = []
    cur = _cursor(conn)
    try:
        bounds: dict[str, list[tuple[str, int, int]]] = {}
        for (kind, subject), cands in groups.items():
            cands.sort()
            hi = max(row[END] for _, _, row in cands)  # type: ignore[type-var]
            bounds.setdefault(kind, []).append((subject, cands[0][0], hi))  # type: ignore[arg-type]
        stored_of = {kind: _stored(cur, conn, kind, b) for kind, b in bounds.items()}
        for (kind, subject), cands in groups.items():
            stored = stored_of[kind].get(subject, [])
            starts = [s for s, _, _ in stored]
            ends = [e for _, e, _ in stored]
            digests = [d for _, _, d in stored]
            for start, index, row in cands:
                end = row[END]
                pos = bisect_left(starts, start)
                if pos < len(starts) and starts[pos] == start:
                    if digests[pos] == row[DIGEST]:
                        duplicates += 1
                    else:
                        natural = f"{kind}:{subject}:{start}"
                        rejected.append((index, f"{natural}: already ingested with other content"))
                        rules[index] = "conflict"
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
                            f"{kind}:{subject}:{start}: overlaps [{starts[clash]}, "
                            f"{ends[clash]}) of the same {kind} subject",
                        )
                    )
                    rules[index] = "overlap"
                    continue
                if pos == len(starts):  # the common case: appended in time order
                    starts.append(start)
                    ends.append(end)  # type: ignore[arg-type]
                    digests.append(row[DIGEST])  # type: ignore[arg-type]
                else:
                    starts.insert(pos, start)
                    ends.insert(pos, end)  # type: ignore[arg-type]
                    digests.insert(pos, row[DIGEST])  # type: ignore[arg-type]
                accepted.append(row)
    finally:
        cur.close()

    if accepted:
        if rater is not None:
            accepted = rater(accepted)
        _insert(conn, accepted)
    rejected.sort()
    return IngestResult(len(accepted), duplicates, rejected, rules)
