"""Meters: usage x price -> charge entries, the delta of the rounded cumulative total.

Per meter the exact cumulative quantity (GPU-seconds or byte-seconds, an integer) is
kept; the exact cumulative cost is quantity x unit_price / (seconds per hour [x bytes
per GiB]); what is posted is ``next_posting(exact, posted_minor)`` from the billing core,
so a meter's charges always sum to its exact total rounded once (ROUND_HALF_EVEN).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction

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
