from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from billing_oracles import A100, H100, sample_pricebook

from gpucloud.billing import (
    BillingError,
    BillingMode,
    NotOffered,
    PackagePeriod,
    Term,
    TermError,
    enter_package,
    expires_at,
    is_expired,
    leave_package,
    package_price,
    package_purchase_decision,
    payg_start_decision,
    reminder_at,
    reminder_due,
    renewal_start,
    to_minor,
)

PB = sample_pricebook()
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_periods_and_terms() -> None:
    assert PackagePeriod.DAY.seconds == 86400
    assert PackagePeriod.WEEK.duration == timedelta(days=7)
    assert PackagePeriod.MONTH.duration == timedelta(hours=720)  # 30 x 24 h, not a calendar month
    assert expires_at(datetime(2026, 2, 1, tzinfo=UTC), PackagePeriod.MONTH) == datetime(
        2026, 3, 3, tzinfo=UTC
    )
    term = Term.starting(T0, PackagePeriod.WEEK)
    renewal = term.renewal()
    assert renewal.start == term.expires_at == renewal_start(term.expires_at)
    assert renewal.expires_at == T0 + timedelta(days=14)
    with pytest.raises(BillingError, match="timezone-aware"):
        expires_at(datetime(2026, 1, 1), PackagePeriod.DAY)
    with pytest.raises(BillingError, match="timezone-aware"):
        Term(PackagePeriod.DAY, datetime(2026, 1, 1), datetime(2026, 1, 2))
    with pytest.raises(TermError, match="must end after it starts"):
        Term(PackagePeriod.DAY, T0, T0)


def test_package_price() -> None:
    assert package_price(PB, A100, PackagePeriod.MONTH, 2) == Decimal("9198")
    with pytest.raises(NotOffered):
        package_price(PB, H100, PackagePeriod.DAY)


@pytest.mark.parametrize("period", list(PackagePeriod))
def test_reminder_when_seven_days_or_less_remain(period: PackagePeriod) -> None:
    expiry = expires_at(T0, period)
    seven = expiry - timedelta(days=7)
    assert reminder_at(expiry) == seven
    # due from 7 days before expiry (at purchase for day and week) until expiry
    assert reminder_due(max(seven, T0), expiry)
    assert reminder_due(expiry - timedelta(seconds=1), expiry)
    assert not reminder_due(expiry, expiry)  # expired: not a reminder any more
    if period is PackagePeriod.MONTH:
        assert not reminder_due(seven - timedelta(seconds=1), expiry)
    assert not is_expired(expiry - timedelta(microseconds=1), expiry)
    assert is_expired(expiry, expiry)


def test_leave_package_hand_worked() -> None:
    term = Term.starting(T0, PackagePeriod.DAY)
    prepaid = to_minor(package_price(PB, A100, PackagePeriod.DAY, 2))  # 398.00
    # 10 h used on 2 GPUs at 9.80 -> 196.00 kept, 202.00 refunded
    s = leave_package(PB, A100, 2, term, prepaid, T0 + timedelta(hours=10))
    assert (s.used_seconds, s.used_minor, s.refund_minor, s.capped) == (36000, 19600, 20200, False)
    # 23 h at pay-as-you-go would be 450.80 > 398.00 prepaid: keep 398.00, refund 0
    s = leave_package(PB, A100, 2, term, prepaid, T0 + timedelta(hours=23))
    assert (s.used_minor, s.refund_minor, s.capped) == (39800, 0, True)
    assert s.used_charge == Decimal("450.8")
    # leaving at once refunds everything; a partial second is not charged
    s = leave_package(PB, A100, 2, term, prepaid, T0 + timedelta(microseconds=999_999))
    assert (s.used_seconds, s.refund_minor) == (0, prepaid)
    with pytest.raises(TermError, match="outside the package term"):
        leave_package(PB, A100, 2, term, prepaid, term.expires_at + timedelta(seconds=1))


def test_enter_package_settles_the_meter_first() -> None:
    # the meter is at 1.005 exact with 0.99 posted: final posting 0.01 (1.005 -> 1.00 half-even)
    out = enter_package(
        PB,
        A100,
        1,
        PackagePeriod.DAY,
        now=T0,
        available_balance_minor=19901,
        meter_exact_cumulative=Decimal("1.005"),
        meter_posted_minor=99,
    )
    assert out.final_meter_posting_minor == 1
    assert out.decision.allowed and out.decision.available_minor == 19900
    assert out.term == Term(PackagePeriod.DAY, T0, T0 + timedelta(days=1))


def test_payg_start_one_hour_rule() -> None:
    # 2 x A100 need 19.60 for one hour
    d = payg_start_decision(1960, A100, 2, PB)
    assert d.allowed and d.needed_minor == 1960
    d = payg_start_decision(1959, A100, 2, PB)
    assert not d.allowed and d.shortfall_minor == 1
    assert d.message == (
        "payAsYouGo start of 2 x NVIDIA-A100-SXM4-80GB (one hour) refused: needs 19.60 CNY, "
        "available 19.59 CNY (short by 0.01 CNY)"
    )
    # with a 100 GiB quota the hour costs 19.64; spot needs 7.80
    assert payg_start_decision(1963, A100, 2, PB, storage_gib=100).needed_minor == 1964
    assert payg_start_decision(780, A100, 2, PB, mode=BillingMode.SPOT).allowed
    # a threshold is rounded up: 0.0004 x 1 GiB for an hour needs 0.01 of balance
    assert payg_start_decision(0, A100, 1, PB, storage_gib=1).needed_minor == 981


def test_package_purchase_decision() -> None:
    d = package_purchase_decision(459899, A100, 1, PackagePeriod.MONTH, PB)
    assert not d.allowed and d.needed_minor == 459900
    assert "month package of 1 x NVIDIA-A100-SXM4-80GB refused" in d.message
    assert package_purchase_decision(459900, A100, 1, PackagePeriod.MONTH, PB).allowed
    with pytest.raises(NotOffered):
        package_purchase_decision(10**9, H100, 1, PackagePeriod.WEEK, PB)
