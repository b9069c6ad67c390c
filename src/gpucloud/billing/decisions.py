"""Admission decisions: may this instance start, may this package be bought?"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from gpucloud.billing.errors import BillingError
from gpucloud.billing.modes import BillingMode, PackagePeriod
from gpucloud.billing.money import (
    Exact,
    format_money,
    format_price,
    minor_exponent,
    to_decimal,
    to_minor,
)
from gpucloud.billing.pricebook import PriceBook
from gpucloud.billing.rating import count, gpu_hourly_exact, quantity


@dataclass(frozen=True)
class Decision:
    allowed: bool
    needed_minor: int
    available_minor: int
    currency: str
    message: str

    @property
    def shortfall_minor(self) -> int:
        return max(0, self.needed_minor - self.available_minor)


def available_balance(
    balance_minor: int,
    accrued_minor: Iterable[int] = (),
    owed_minor: Iterable[int] = (),
    reserved_minor: Iterable[int] = (),
) -> int:
    """The balance the one-hour rule (and a package purchase) is judged on: the balance
    minus what running pay-as-you-go/spot instances have accrued but not yet posted (the
    seed: "the balance will deduct the costs of the running instances"), minus what
    stopped runs still owe until they are settled, minus amounts already committed but
    not yet charged (admitted package terms, renewals due). Each is >= 0."""
    deducted = 0
    for what, amounts in (
        ("accrued_minor", accrued_minor),
        ("owed_minor", owed_minor),
        ("reserved_minor", reserved_minor),
    ):
        deducted += sum(count(a, what) for a in amounts)
    return count_signed(balance_minor, "balance_minor") - deducted


def count_signed(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BillingError(f"{what} must be an int of minor units, not {type(value).__name__}")
    return value


def _decide(needed: int, available: int, currency: str, what: str) -> Decision:
    ok = available >= needed
    verdict = "allowed" if ok else "refused"
    message = (
        f"{what} {verdict}: needs {format_money(needed, currency)}, "
        f"available {format_money(available, currency)}"
    )
    if not ok:
        message += f" (short by {format_money(needed - available, currency)})"
    return Decision(ok, needed, available, currency, message)


def one_hour_exact(
    pricebook: PriceBook,
    product: str,
    gpu_count: int,
    *,
    mode: BillingMode = BillingMode.PAY_AS_YOU_GO,
    storage_gib: Exact = 0,
) -> Fraction:
    """One hour of a metered instance, exactly, in currency units: its GPUs at the hourly
    price of ``mode`` plus its storage quota (the one-hour rule's figure)."""
    hour = gpu_hourly_exact(pricebook, product, gpu_count, mode)
    return hour + Fraction(pricebook.storage.instance_per_gb_hour) * quantity(
        storage_gib, "storage_gib"
    )


def payg_start_decision(
    available_balance_minor: int,
    product: str,
    gpu_count: int,
    pricebook: PriceBook,
    *,
    mode: BillingMode = BillingMode.PAY_AS_YOU_GO,
    storage_gib: Exact = 0,
) -> Decision:
    """The one-hour rule: a pay-as-you-go (or spot) instance may start only while the
    available balance is *greater than* (the seed's words) one hour of it: its GPUs at
    the hourly price of ``mode``, plus its storage quota for an hour when ``storage_gib``
    is given. A balance exactly equal to the hour is refused. ``needed_minor`` is the
    least balance that is greater than the exact hour cost (a comparison, not a posting:
    nothing is rounded to the even neighbour here)."""
    count_signed(available_balance_minor, "available_balance_minor")
    hour = one_hour_exact(pricebook, product, gpu_count, mode=mode, storage_gib=storage_gib)
    currency = pricebook.currency
    needed = math.floor(hour * 10 ** minor_exponent(currency)) + 1
    ok = available_balance_minor > hour * 10 ** minor_exponent(currency)
    message = (
        f"{mode} start of {gpu_count} x {product} (one hour) "
        f"{'allowed' if ok else 'refused'}: the available balance must be greater than "
        f"one hour's cost, {format_price(to_decimal(hour), currency)}; available "
        f"{format_money(available_balance_minor, currency)}"
    )
    if not ok:
        short = needed - available_balance_minor
        message += f" (short by {format_money(short, currency)})"
    return Decision(ok, needed, available_balance_minor, currency, message)


def package_purchase_decision(
    available_balance_minor: int,
    product: str,
    gpu_count: int,
    period: PackagePeriod,
    pricebook: PriceBook,
) -> Decision:
    """A package term is paid upfront: the balance must cover its price as it will be
    posted (to_minor of the exact price)."""
    count_signed(available_balance_minor, "available_balance_minor")
    count(gpu_count, "gpu_count", 1)
    period = PackagePeriod(period)
    price = Fraction(pricebook.gpu_price(product).package_price(period)) * gpu_count
    needed = to_minor(price, pricebook.currency)
    what = f"{period} package of {gpu_count} x {product}"
    return _decide(needed, available_balance_minor, pricebook.currency, what)
