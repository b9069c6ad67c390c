"""Instants and intervals, exactly.

An instant is a timezone-aware ``datetime`` or an ``int`` of POSIX seconds (the usage
records' unit); both become integer microseconds since the epoch, so interval
arithmetic is exact (a ``datetime`` has microsecond resolution).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from gpucloud.billing.errors import BillingError, TermError

Instant = datetime | int
US_PER_S = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def to_us(t: Instant, what: str = "instant") -> int:
    """Integer microseconds since the epoch."""
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise BillingError(f"{what} must be timezone-aware (got naive {t.isoformat()})")
        return (t - _EPOCH) // _ONE_US
    if isinstance(t, bool) or not isinstance(t, int):
        raise BillingError(f"{what} must be an aware datetime or int POSIX seconds, not {t!r}")
    return t * US_PER_S


def interval_us(start: Instant, end: Instant, what: str = "interval") -> tuple[int, int]:
    a, b = to_us(start, f"{what} start"), to_us(end, f"{what} end")
    if b < a:
        raise TermError(f"{what} ends before it starts ({start} > {end})")
    return a, b


def covered_us(window: tuple[int, int], intervals: Iterable[tuple[int, int]]) -> int:
    """Microseconds of ``window`` covered by the union of ``intervals`` (overlaps counted once)."""
    lo, hi = window
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, reach = 0, lo
    for a, b in clipped:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def elapsed_seconds(start: datetime, end: datetime) -> int:
    """Whole seconds from start to end; a partial last second is not counted (billing is
    settled by the second, in the customer's favour)."""
    a, b = interval_us(start, end)
    return (b - a) // US_PER_S


def hour_windows(start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """The UTC clock-hour windows [h, h+1h) that cover [start, end), clipped to it: the
    hourly settlement windows of storage from creation to release."""
    a, b = interval_us(start, end)
    start_utc = _EPOCH + timedelta(microseconds=a)
    cursor = start_utc.replace(minute=0, second=0, microsecond=0)
    end_utc = _EPOCH + timedelta(microseconds=b)
    while cursor < end_utc:
        nxt = cursor + timedelta(hours=1)
        yield max(cursor, start_utc), min(nxt, end_utc)
        cursor = nxt
