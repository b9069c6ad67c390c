"""Prepaid packages: prices, terms, reminders, expiry, and switching billing mode."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from gpucloud.billing.decisions import Decision, package_purchase_decision
from gpucloud.billing.errors import BillingError, TermError
from gpucloud.billing.intervals import elapsed_seconds, to_us
from gpucloud.billing.modes import BillingMode, PackagePeriod
from gpucloud.billing.money import Exact, next_posting, to_decimal, to_minor
from gpucloud.billing.pricebook import PriceBook
from gpucloud.billing.rating import count, gpu_cost_exact

REMINDER_WINDOW = timedelta(days=7)  # the seed: 7 days before expiry, for every period


def package_price_exact(
    pb: PriceBook, product: str, period: PackagePeriod, gpu_count: int = 1
) -> Fraction:
    count(gpu_count, "gpu_count", 1)
    return Fraction(pb.gpu_price(product).package_price(PackagePeriod(period))) * gpu_count


def package_price(
    pb: PriceBook, product: str, period: PackagePeriod, gpu_count: int = 1
) -> Decimal:
    """The upfront price of one term for ``gpu_count`` GPUs (post it with to_minor)."""
    return to_decimal(package_price_exact(pb, product, period, gpu_count))


def _aware(t: datetime, what: str) -> datetime:
    if not isinstance(t, datetime):
        raise BillingError(f"{what} must be a timezone-aware datetime, not {t!r}")
    to_us(t, what)  # refuses naive datetimes
    return t


def expires_at(start: datetime, period: PackagePeriod) -> datetime:
    """End of the term that starts at ``start`` (exclusive): start + 24 h / 7x24 h / 30x24 h."""
    return _aware(start, "start") + PackagePeriod(period).duration


@dataclass(frozen=True)
class Term:
    """One paid package term [start, expires_at)."""

    period: PackagePeriod
    start: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        _aware(self.start, "term start")
        if _aware(self.expires_at, "term expires_at") <= self.start:
            raise TermError(f"a package term must end after it starts ({self.start.isoformat()})")

    @classmethod
    def starting(cls, start: datetime, period: PackagePeriod) -> Term:
        return cls(PackagePeriod(period), start, expires_at(start, period))

    def renewal(self) -> Term:
        """The next term of an auto-renewal: it starts at this term's expiry, not at the
        moment the renewal is charged, so no second is paid twice or lost."""
        return Term.starting(self.expires_at, self.period)

    def as_interval(self) -> tuple[datetime, datetime]:
        """For instance_storage_charge(package_terms=...)."""
        return self.start, self.expires_at


def renewal_start(previous_expiry: datetime) -> datetime:
    """A renewed term starts exactly when the previous one expires."""
    return _aware(previous_expiry, "previous_expiry")


def reminder_at(expiry: datetime) -> datetime:
    """When the expiry reminder falls due: 7 days before expiry (at once for a day or week
    package, whose whole term is within 7 days)."""
    return _aware(expiry, "expires_at") - REMINDER_WINDOW


def reminder_due(now: datetime, expiry: datetime) -> bool:
    """True while the term has not expired and 7 days or less remain. Sending it once per
    term is the caller's bookkeeping."""
    remaining = _aware(expiry, "expires_at") - _aware(now, "now")
    return timedelta(0) < remaining <= REMINDER_WINDOW


def is_expired(now: datetime, expiry: datetime) -> bool:
    """A term [start, expiry) has expired from its expiry instant on."""
    return _aware(now, "now") >= _aware(expiry, "expires_at")


# Switching billing mode ------------------------------------------------------------------


@dataclass(frozen=True)
class SwitchSettlement:
    """Leaving a package term early: the used time at the pay-as-you-go rate is kept, the
    rest of what was prepaid for the term is refunded. used_minor + refund_minor ==
    prepaid_minor, and both are >= 0."""

    currency: str
    used_seconds: int
    used_charge: Decimal  # exact, at the pay-as-you-go rate, before capping
    prepaid_minor: int
    used_minor: int  # min(to_minor(used_charge), prepaid_minor)
    refund_minor: int
    capped: bool  # the used time at pay-as-you-go cost more than the prepaid amount


def leave_package(
    pb: PriceBook,
    product: str,
    gpu_count: int,
    term: Term,
    prepaid_minor: int,
    now: datetime,
) -> SwitchSettlement:
    """Settle a package term left at ``now`` (package -> pay-as-you-go, spot, or another
    package). The used time [term.start, now) in whole seconds is charged at the
    pay-as-you-go rate (the seed, whatever the new mode), never more than was prepaid; the
    rest is refunded, never below zero."""
    count(prepaid_minor, "prepaid_minor")
    if not term.start <= _aware(now, "now") <= term.expires_at:
        raise TermError(
            f"switch time {now.isoformat()} is outside the package term "
            f"[{term.start.isoformat()}, {term.expires_at.isoformat()}]"
        )
    used_s = elapsed_seconds(term.start, now)
    used = gpu_cost_exact(pb, product, used_s, gpu_count, BillingMode.PAY_AS_YOU_GO)
    rounded = to_minor(used, pb.currency)
    used_minor = min(rounded, prepaid_minor)
    return SwitchSettlement(
        currency=pb.currency,
        used_seconds=used_s,
        used_charge=to_decimal(used),
        prepaid_minor=prepaid_minor,
        used_minor=used_minor,
        refund_minor=prepaid_minor - used_minor,
        capped=rounded > prepaid_minor,
    )


@dataclass(frozen=True)
class EnterPackage:
    """Pay-as-you-go (or spot) -> package: the meter's last posting, then the purchase."""

    final_meter_posting_minor: int  # post this first: the metered time up to the switch
    decision: Decision  # the purchase, judged on the balance after that posting
    term: Term  # the new term, starting at the switch instant


def enter_package(
    pb: PriceBook,
    product: str,
    gpu_count: int,
    period: PackagePeriod,
    *,
    now: datetime,
    available_balance_minor: int,
    meter_exact_cumulative: Exact,
    meter_posted_minor: int,
) -> EnterPackage:
    """The metered time so far stays charged at its own (pay-as-you-go or spot) rate,
    settled to the second through the meter; the package term starts at ``now``."""
    final = next_posting(meter_exact_cumulative, meter_posted_minor, pb.currency)
    decision = package_purchase_decision(
        available_balance_minor - final, product, gpu_count, period, pb
    )
    return EnterPackage(final, decision, Term.starting(now, period))
