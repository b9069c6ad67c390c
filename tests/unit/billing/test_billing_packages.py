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
from gpucloud.crd.pricebook import price_book

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
    # 2 x A100 cost 19.60 for one hour: the balance must be greater than that (the seed)
    d = payg_start_decision(1960, A100, 2, PB)
    assert not d.allowed and d.needed_minor == 1961 and d.shortfall_minor == 1
    assert d.message == (
        "payAsYouGo start of 2 x NVIDIA-A100-SXM4-80GB (one hour) refused: the available "
        "balance must be greater than one hour's cost, 19.60 CNY; available 19.60 CNY "
        "(short by 0.01 CNY)"
    )
    assert payg_start_decision(1961, A100, 2, PB).allowed
    assert not payg_start_decision(1959, A100, 2, PB).allowed
    # with a 100 GiB quota the hour costs 19.64; spot needs more than 7.80
    assert payg_start_decision(1963, A100, 2, PB, storage_gib=100).needed_minor == 1965
    assert not payg_start_decision(780, A100, 2, PB, mode=BillingMode.SPOT).allowed
    assert payg_start_decision(781, A100, 2, PB, mode=BillingMode.SPOT).allowed
    # an hour that is not a whole fen: 9.80 + 0.0004 x 1 GiB = 9.8004, so 9.81 is enough
    d = payg_start_decision(980, A100, 1, PB, storage_gib=1)
    assert not d.allowed and d.needed_minor == 981
    assert "one hour's cost, 9.8004 CNY; available 9.80 CNY" in d.message


def test_one_hour_rule_at_the_seed_boundary_with_ragged_prices() -> None:
    """19.80/h and 9.90/h (spot), 0.0005/GiB-h storage: a balance equal to the hour is
    refused, one minor unit more is allowed."""
    pb = price_book(
        {
            "currency": "CNY",
            "gpus": [{"product": H100, "payAsYouGoPerHour": "19.80", "spotPerHour": "9.90"}],
            "storage": {
                "instancePerGBHour": "0.0005",
                "cloudDiskPerGBHour": "0.0005",
                "imagePerGBHour": "0.0005",
            },
            "models": {
                "per1KTokens": "0",
                "perImage": "0",
                "perVideo": "0",
                "personalPerRequestSecond": "0",
            },
        }
    )
    assert not payg_start_decision(1980, H100, 1, pb).allowed
    assert payg_start_decision(1981, H100, 1, pb).allowed
    spot = BillingMode.SPOT
    assert not payg_start_decision(990, H100, 1, pb, mode=spot).allowed
    assert payg_start_decision(991, H100, 1, pb, mode=spot).allowed
    # 19.80 + 50 GiB x 0.0005 = 19.825: 19.82 is not greater, 19.83 is
    d = payg_start_decision(1982, H100, 1, pb, storage_gib=50)
    assert not d.allowed and "19.825 CNY" in d.message and "short by 0.01 CNY" in d.message
    assert payg_start_decision(1983, H100, 1, pb, storage_gib=50).allowed


def test_package_purchase_decision() -> None:
    d = package_purchase_decision(459899, A100, 1, PackagePeriod.MONTH, PB)
    assert not d.allowed and d.needed_minor == 459900
    assert "month package of 1 x NVIDIA-A100-SXM4-80GB refused" in d.message
    assert package_purchase_decision(459900, A100, 1, PackagePeriod.MONTH, PB).allowed
    with pytest.raises(NotOffered):
        package_purchase_decision(10**9, H100, 1, PackagePeriod.WEEK, PB)
