"""Meters: usage x price -> charge entries, the delta of the rounded cumulative total.

Per meter the exact cumulative quantity (GPU-seconds or byte-seconds, an integer) is
kept; the exact cumulative cost is quantity x unit_price / (seconds per hour [x bytes
per GiB]); what is posted is ``next_posting(exact, posted_minor)`` from the billing core,
so a meter's charges always sum to its exact total rounded once (ROUND_HALF_EVEN).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, text

from gpucloud.billing.money import to_minor
from gpucloud.ledger.schema import to_us
from gpucloud.ledger.types import Meter, MeterKind, MeterUnit
from gpucloud.usage import HOUR_S

GIB = 2**30

UNIT_FOR_KIND = {
    MeterKind.GPU_TIME: MeterUnit.GPU_HOUR,
    MeterKind.CLOUD_DISK: MeterUnit.GB_HOUR,
    MeterKind.IMAGE: MeterUnit.GB_HOUR,
    MeterKind.INSTANCE_VOLUME: MeterUnit.GB_HOUR,
}


def divisor(unit: MeterUnit) -> int:
    """Quantity units per priced unit: 3600 GPU-seconds per GPU-hour, 3600 x 2^30
    byte-seconds per GiB-hour."""
    return HOUR_S if unit is MeterUnit.GPU_HOUR else HOUR_S * GIB


def meter_window(meter: Meter) -> tuple[int, int | None]:
    """The meter's interval in whole POSIX seconds, [floor(opened), floor(closed)), so a
    meter closed at t and its successor opened at t share no second and miss none."""
    opened = to_us(meter.opened_at) // 1_000_000  # exact integers, no float timestamps
    closed = None if meter.closed_at is None else to_us(meter.closed_at) // 1_000_000
    return opened, closed


def clipped_measure(
    kind: str, start: int, end: int, quantity: int, window: tuple[int, int | None]
) -> int:
    """GPU-seconds or byte-seconds of one record inside the meter's window."""
    lo = max(start, window[0])
    hi = end if window[1] is None else min(end, window[1])
    seconds = max(0, hi - lo)
    if kind == MeterKind.GPU_TIME.value:
        return seconds  # one GPU: quantity == end - start
    return quantity * seconds


def exact_cost(quantity: int, meter: Meter) -> Fraction:
    return Fraction(quantity) * Fraction(meter.unit_price) / divisor(meter.unit)


def rounded_cost(quantity: int, meter: Meter, currency: str) -> int:
    return to_minor(exact_cost(quantity, meter), currency)


def sum_clipped(rows: Iterable[tuple[str, int, int, int]], window: tuple[int, int | None]) -> int:
    return sum(clipped_measure(k, s, e, q, window) for k, s, e, q in rows)


# -- set-based rating of one meter's pending usage (SQL) --------------------------------
# The rows a meter rates in one transaction: unrated, same kind and owner, overlapping
# its window, ended by now; in a backlog, the earliest ``chunk`` or so of them.
# The sum and the update below use the same condition inside one transaction whose
# writes to usage are serialised (BEGIN IMMEDIATE on SQLite, the usage advisory lock
# on PostgreSQL), so they see exactly the same rows.
_PENDING = (
    "rated_until < end_s AND kind = :kind AND owner = :owner AND end_s > :opened AND end_s <= :now"
)


@dataclass(frozen=True)
class Pending:
    count: int
    quantity: int  # GPU-seconds or byte-seconds inside the meter's window
    last_end: int  # latest end among them, clipped to the close of the meter
    cond: str  # the SQL condition that selects them
    params: dict[str, Any]


def _measure(
    conn: Connection, kind: str, window: tuple[int, int | None], cond: str, params: dict[str, Any]
) -> tuple[int, int, int | None]:
    """(rows, quantity inside the window, latest end) of the usage selected by cond."""
    if kind == MeterKind.GPU_TIME.value:
        # Seconds inside [opened, closed): small integers, summed exactly by SQL.
        lo = "CASE WHEN rated_until > :opened THEN rated_until ELSE :opened END"
        hi = "CASE WHEN end_s < :closed THEN end_s ELSE :closed END"
        if window[1] is None:
            hi = "end_s"
        count, quantity, last_end = conn.execute(
            text(
                f"SELECT count(*), coalesce(sum({hi} - ({lo})), 0), max(end_s) "
                f"FROM ledger_usage WHERE {cond}"
            ),
            params,
        ).one()
        return int(count), int(quantity), last_end
    # Byte-seconds may exceed 64 bits: summed by Python (few, hourly records).
    rows = conn.execute(
        text(f"SELECT kind, rated_until, end_s, quantity FROM ledger_usage WHERE {cond}"), params
    ).all()
    return len(rows), sum_clipped(rows, window), max((r[2] for r in rows), default=None)  # type: ignore[arg-type]


def pending_condition(
    kind: str, owner: str, window: tuple[int, int | None], now_s: int
) -> tuple[str, dict[str, Any]]:
    """The SQL condition of the unrated usage a meter's window may rate."""
    cond = _PENDING
    params: dict[str, Any] = {"kind": kind, "owner": owner, "opened": window[0], "now": now_s}
    if window[1] is not None:
        cond += " AND rated_until < :closed"
        params["closed"] = window[1]
    return cond, params


def pending_usage(
    conn: Connection,
    kind: str,
    owner: str,
    window: tuple[int, int | None],
    now_s: int,
    chunk: int,
    terms: tuple[str, dict[str, Any]] = ("", {}),
) -> Pending:
    """Count and measure (clipped to ``window``) the usage a meter rates next; ``terms``
    (gpucloud.ledger.admission.terms_sql) restricts it to what the meter may charge."""
    cond, params = pending_condition(kind, owner, window, now_s)
    cond += terms[0]
    params.update(terms[1])
    count, quantity, last_end = _measure(conn, kind, window, cond, params)
    if count > chunk:  # a backlog: rate the earliest chunk (rows of equal start together)
        params["bound"] = conn.execute(
            text(
                f"SELECT start_s FROM ledger_usage WHERE {cond} "
                "ORDER BY start_s LIMIT 1 OFFSET :skip"
            ),
            {**params, "skip": chunk - 1},
        ).scalar_one()
        cond += " AND start_s <= :bound"
        count, quantity, last_end = _measure(conn, kind, window, cond, params)
    if count == 0:
        return Pending(0, 0, 0, cond, params)
    if window[1] is not None:
        last_end = min(last_end, window[1])
    return Pending(int(count), quantity, int(last_end), cond, params)


def mark_rated(
    conn: Connection, pending: Pending, meter_id: str, closed_s: int | None, rated_at_us: int
) -> None:
    """Mark the pending rows rated by ``meter_id``: up to their end, or to the close of
    the meter (a successor meter rates the rest of a record that straddles it)."""
    rated_until = "end_s" if closed_s is None else (
        "CASE WHEN end_s < :closed THEN end_s ELSE :closed END"
    )  # fmt: skip
    result = conn.execute(
        text(
            f"UPDATE ledger_usage SET meter_id = :meter_id, rated_at = :rated_at, "
            f"rated_until = {rated_until} WHERE {pending.cond}"
        ),
        {**pending.params, "meter_id": meter_id, "rated_at": rated_at_us},
    )
    if result.rowcount != pending.count:  # cannot happen while writers are serialised
        raise RuntimeError(
            f"meter {meter_id}: marked {result.rowcount} usage rows rated, summed {pending.count}"
        )
