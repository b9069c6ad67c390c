"""A monthly account statement: opening balance, every payment, refund, adjustment and
charge of the period (charges grouped by resource, with GPU-seconds and rates), closing
balance. Pure: the entries and usage come in, nothing is read or rounded here (entries
are already integer minor units), so closing = opening + the period's entries, exactly.

Periods are calendar months in UTC; an entry belongs to the month its ``at`` falls in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gpucloud.billing.errors import BillingError

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


class PeriodError(BillingError):
    """A period that is not YYYY-MM; the message names the field."""


@dataclass(frozen=True, order=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str, what: str = "period") -> Period:
        m = _PERIOD.match(text)
        if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1970:
            raise PeriodError(f"{what}: {text!r} is not a month written YYYY-MM, e.g. 2026-11")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """The first instant after the period (exclusive)."""
        if self.month == 12:
            return datetime(self.year + 1, 1, 1, tzinfo=UTC)
        return datetime(self.year, self.month + 1, 1, tzinfo=UTC)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


@dataclass(frozen=True)
class Line:
    """One ledger entry as the statement shows it (signed minor units: charges < 0)."""

    at: datetime
    kind: str  # recharge | refund | adjustment | charge
    amount_minor: int
    resource: str | None
    memo: str


@dataclass(frozen=True)
class ResourceCharges:
    resource: str  # "" for charges without one
    lines: tuple[Line, ...]
    gpu_seconds: int  # GPU-seconds of usage that started in the period
    rates: tuple[str, ...]  # the meters' prices, as people read them ("19.80 CNY / GPU-hour")

    @property
    def total_minor(self) -> int:
        """Signed: negative for a net charge."""
        return sum(line.amount_minor for line in self.lines)


@dataclass(frozen=True)
class Statement:
    account: str
    currency: str
    period: Period
    opening_minor: int
    payments: tuple[Line, ...]  # recharges
    refunds: tuple[Line, ...]
    adjustments: tuple[Line, ...]
    charges: tuple[ResourceCharges, ...]  # by resource name
    closing_minor: int

    @property
    def lines(self) -> list[Line]:
        return [
            *self.payments, *self.refunds, *self.adjustments,
            *(line for group in self.charges for line in group.lines),
        ]  # fmt: skip


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def build(
    account: str,
    currency: str,
    period: Period,
    entries: Iterable[Line],
    gpu_seconds: Mapping[str, int] | None = None,
    rates: Mapping[str, Sequence[str]] | None = None,
) -> Statement:
    """``entries``: all of the account's entries (any time); those before the period make
    the opening balance, those in it are listed, later ones are ignored."""
    gpu_seconds = gpu_seconds or {}
    rates = rates or {}
    start, end = period.start, period.end
    opening = 0
    in_period: list[Line] = []
    for line in entries:
        at = _utc(line.at)
        if at < start:
            opening += line.amount_minor
        elif at < end:
            in_period.append(line)
    in_period.sort(key=lambda line: _utc(line.at))
    by_resource: dict[str, list[Line]] = {}
    for line in in_period:
        if line.kind == "charge":
            by_resource.setdefault(line.resource or "", []).append(line)
    charges = tuple(
        ResourceCharges(
            resource=res,
            lines=tuple(lines),
            gpu_seconds=int(gpu_seconds.get(res, 0)),
            rates=tuple(rates.get(res, ())),
        )
        for res, lines in sorted(by_resource.items())
    )
    return Statement(
        account=account,
        currency=currency,
        period=period,
        opening_minor=opening,
        payments=tuple(line for line in in_period if line.kind == "recharge"),
        refunds=tuple(line for line in in_period if line.kind == "refund"),
        adjustments=tuple(line for line in in_period if line.kind == "adjustment"),
        charges=charges,
        closing_minor=opening + sum(line.amount_minor for line in in_period),
    )
