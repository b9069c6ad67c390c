"""Every rule against an independent oracle written plainly here, over random prices,
durations and boundaries."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from billing_oracles import A100, PROPS, assert_exact, minor_of, pricebooks
from hypothesis import assume, given
from hypothesis import strategies as st

from gpucloud.billing import (
    GIB,
    BillingMode,
    PackagePeriod,
    PriceBook,
    PriceError,
    RunningTotal,
    Term,
    cloud_disk_charge,
    expires_at,
    gpu_cost,
    hour_windows,
    hours_affordable,
    image_charge,
    instance_storage_charge,
    instance_storage_charge_exact,
    is_expired,
    leave_package,
    model_online_charge,
    next_posting,
    official_model_charge,
    package_price,
    package_purchase_decision,
    payg_start_decision,
    personal_model_charge,
    reminder_due,
    to_minor,
)

BASE = 1_767_225_600  # 2026-01-01T00:00:00Z, an hour edge
# Durations that hit the boundaries: zero, one second, exactly one hour and its neighbours.
durations = st.one_of(st.sampled_from([0, 1, 3599, 3600, 3601, 7200]), st.integers(0, 7300))
modes = st.sampled_from([BillingMode.PAY_AS_YOU_GO, BillingMode.SPOT])


def hourly(pb: PriceBook, mode: BillingMode) -> Fraction:
    gpu = pb.gpus[0]
    return Fraction(
        gpu.pay_as_you_go_per_hour if mode is BillingMode.PAY_AS_YOU_GO else gpu.spot_per_hour
    )


@PROPS
@given(pricebooks(), durations, st.integers(1, 8), modes)
def test_gpu_cost_equals_second_by_second_sum(
    pb: PriceBook, seconds: int, gpus: int, mode: BillingMode
) -> None:
    per_second = hourly(pb, mode) / 3600  # n/d; summed as integer numerators for speed
    total = 0
    for _ in range(seconds):
        for _ in range(gpus):
            total += per_second.numerator
    oracle = Fraction(total, per_second.denominator)
    assert_exact(gpu_cost(pb, A100, seconds, gpus, mode), oracle, pb.currency)


@PROPS
@given(pricebooks(), st.lists(st.integers(0, 50), min_size=1, max_size=30), modes)
def test_gpu_meter_postings_sum_to_the_rounded_total(
    pb: PriceBook, windows: list[int], mode: BillingMode
) -> None:
    """The agent ships GPU-seconds in small windows; the ledger posts deltas of the
    rounded cumulative cost and ends at the exact total rounded once."""
    seconds, posted = 0, 0
    for w in windows:
        seconds += w
        delta = next_posting(gpu_cost(pb, A100, seconds, 1, mode), posted, pb.currency)
        assert delta >= 0
        posted += delta
    assert posted == minor_of(hourly(pb, mode) * seconds / 3600, pb.currency)


terms = st.lists(
    st.tuples(st.integers(-4000, 7600), st.integers(0, 5000)).map(
        lambda t: (BASE + t[0], BASE + t[0] + t[1])
    ),
    max_size=4,
)


@PROPS
@given(
    pricebooks(),
    st.integers(0, 2000),
    st.one_of(
        st.sampled_from([(0, 3600), (0, 0), (1, 3599)]),
        st.tuples(st.integers(0, 3600), st.integers(0, 3600)).map(sorted),
    ),
    terms,
)
def test_instance_storage_equals_second_by_second_simulation(
    pb: PriceBook, quota: int, window: tuple[int, int], package_terms: list[tuple[int, int]]
) -> None:
    lo, hi = BASE + window[0], BASE + window[1]
    per_second = Fraction(pb.storage.instance_per_gb_hour) * quota / 3600
    total = 0
    for s in range(lo, hi):
        if not any(a <= s < b for a, b in package_terms):
            total += per_second.numerator
    oracle = Fraction(total, per_second.denominator)
    assert_exact(instance_storage_charge(pb, quota, lo, hi, package_terms), oracle, pb.currency)
    # the same instants as datetimes give the same charge
    as_dt = [(_dt(a), _dt(b)) for a, b in package_terms]
    assert instance_storage_charge(pb, quota, _dt(lo), _dt(hi), as_dt) == instance_storage_charge(
        pb, quota, lo, hi, package_terms
    )


def _dt(posix: int) -> datetime:
    return datetime.fromtimestamp(posix, UTC)


@PROPS
@given(pricebooks(), st.integers(1, 500), st.integers(0, 30_000), st.integers(1, 30_000), terms)
def test_storage_hour_by_hour_settlement_adds_up(
    pb: PriceBook, quota: int, start: int, length: int, package_terms: list[tuple[int, int]]
) -> None:
    """Settling every clock hour, posting deltas of the rounded cumulative, posts the
    whole span's exact charge rounded once (the exact rationals, as the operator adds
    them: the Decimal of a non-terminating hour cut a fen off a half-fen tie)."""
    lo, hi = _dt(BASE + start - 5000), _dt(BASE + start - 5000 + length)
    as_dt = [(_dt(a), _dt(b)) for a, b in package_terms]
    cumulative, posted = Fraction(0), 0
    for a, b in hour_windows(lo, hi):
        assert b - a <= timedelta(hours=1)
        cumulative += instance_storage_charge_exact(pb, quota, a, b, as_dt)
        posted += next_posting(cumulative, posted, pb.currency)
    whole = instance_storage_charge_exact(pb, quota, lo, hi, as_dt)
    assert cumulative == whole
    assert posted == to_minor(whole, pb.currency)


@PROPS
@given(
    pricebooks(), st.lists(st.tuples(st.integers(0, 10 * GIB), st.integers(0, 3600)), max_size=20)
)
def test_cloud_disk_and_image_per_gib_hour(pb: PriceBook, records: list[tuple[int, int]]) -> None:
    byte_seconds = sum(b * s for b, s in records)
    oracle_disk = sum(
        (
            Fraction(pb.storage.cloud_disk_per_gb_hour) * Fraction(b, 2**30) * Fraction(s, 3600)
            for b, s in records
        ),
        Fraction(0),
    )
    oracle_image = sum(
        (
            Fraction(pb.storage.image_per_gb_hour) * Fraction(b * s, 2**30 * 3600)
            for b, s in records
        ),
        Fraction(0),
    )
    assert_exact(cloud_disk_charge(pb, byte_seconds), oracle_disk, pb.currency)
    assert_exact(image_charge(pb, byte_seconds), oracle_image, pb.currency)


@PROPS
@given(
    pricebooks(),
    st.integers(0, 10**7),
    st.integers(0, 1000),
    st.integers(0, 100),
    st.lists(st.integers(0, 600_000), max_size=30),
    st.integers(1, 8),
    st.lists(durations, max_size=6),
)
def test_models(
    pb: PriceBook,
    tokens: int,
    images: int,
    videos: int,
    runtimes_ms: list[int],
    gpus: int,
    online: list[int],
) -> None:
    m = pb.models
    official = (
        Fraction(m.per_1k_tokens) * tokens / 1000
        + Fraction(m.per_image) * images
        + Fraction(m.per_video) * videos
    )
    assert_exact(
        official_model_charge(pb, tokens=tokens, images=images, videos=videos),
        official,
        pb.currency,
    )
    personal = sum(
        (Fraction(m.personal_per_request_second) * ms / 1000 for ms in runtimes_ms), Fraction(0)
    )
    assert_exact(personal_model_charge(pb, runtimes_ms), personal, pb.currency)
    per_gpu_second = Fraction(pb.gpus[0].online_per_hour) / 3600
    private = sum((per_gpu_second * gpus * s for s in online), Fraction(0))
    assert_exact(model_online_charge(pb, A100, gpus, online), private, pb.currency)


periods = st.sampled_from(list(PackagePeriod))


@PROPS
@given(pricebooks(), periods, st.integers(1, 8), st.integers(0, 30 * 86400), st.integers(0, 10**9))
def test_leaving_a_package_never_refunds_below_zero_nor_keeps_more_than_prepaid(
    pb: PriceBook, period: PackagePeriod, gpus: int, used_s: int, extra_prepaid: int
) -> None:
    term = Term.starting(_dt(BASE), period)
    used_s = min(used_s, period.seconds)
    # prepaid: the package price as posted, or any other amount the ledger says was paid
    prepaid = (
        to_minor(package_price(pb, A100, period, gpus), pb.currency)
        if extra_prepaid % 3
        else extra_prepaid
    )
    now = term.start + timedelta(seconds=used_s, microseconds=extra_prepaid % 1_000_000)
    if now > term.expires_at:
        now = term.expires_at
    s = leave_package(pb, A100, gpus, term, prepaid, now)
    used_exact = Fraction(pb.gpus[0].pay_as_you_go_per_hour) * gpus * s.used_seconds / 3600
    assert s.used_seconds == (now - term.start) // timedelta(seconds=1)
    assert s.used_minor == min(minor_of(used_exact, pb.currency), prepaid)
    assert s.refund_minor >= 0 and s.used_minor >= 0
    assert s.used_minor + s.refund_minor == prepaid
    assert s.capped == (minor_of(used_exact, pb.currency) > prepaid)
    # leaving later never refunds more
    later = leave_package(
        pb, A100, gpus, term, prepaid, min(now + timedelta(seconds=1), term.expires_at)
    )
    assert later.refund_minor <= s.refund_minor


@PROPS
@given(pricebooks(), periods, st.integers(-40 * 86400, 40 * 86400))
def test_reminder_and_expiry_oracle(pb: PriceBook, period: PackagePeriod, offset: int) -> None:
    start = _dt(BASE)
    expiry = expires_at(start, period)
    assert (expiry - start).total_seconds() == {"day": 1, "week": 7, "month": 30}[period] * 86400
    now = start + timedelta(seconds=offset)
    remaining = (expiry - now).total_seconds()
    assert reminder_due(now, expiry) == (0 < remaining <= 7 * 86400)
    assert is_expired(now, expiry) == (remaining <= 0)


@PROPS
@given(pricebooks(), st.integers(1, 8), st.integers(-10, 10**7), modes, st.integers(0, 500))
def test_one_hour_rule_against_exact_comparison(
    pb: PriceBook, gpus: int, available: int, mode: BillingMode, quota: int
) -> None:
    hour = hourly(pb, mode) * gpus + Fraction(pb.storage.instance_per_gb_hour) * quota
    exp = {"CNY": 2, "USD": 2, "EUR": 2, "JPY": 0}[pb.currency]
    d = payg_start_decision(available, A100, gpus, pb, mode=mode, storage_gib=quota)
    # the seed: "the balance is greater than the usage cost of one hour"
    assert d.allowed == (Fraction(available, 10**exp) > hour)
    # needed_minor is the least balance greater than the hour; one minor unit less is not
    assert Fraction(d.needed_minor, 10**exp) > hour >= Fraction(d.needed_minor - 1, 10**exp)
    assert payg_start_decision(d.needed_minor, A100, gpus, pb, mode=mode, storage_gib=quota).allowed
    assert not payg_start_decision(
        d.needed_minor - 1, A100, gpus, pb, mode=mode, storage_gib=quota
    ).allowed


@PROPS
@given(pricebooks(), st.integers(1, 8), periods, st.integers(0, 10**8))
def test_package_purchase_needs_the_posted_price(
    pb: PriceBook, gpus: int, period: PackagePeriod, available: int
) -> None:
    price = Fraction(pb.gpus[0].package_price(period)) * gpus
    d = package_purchase_decision(available, A100, gpus, period, pb)
    assert d.needed_minor == minor_of(price, pb.currency)
    assert d.allowed == (available >= d.needed_minor)


@PROPS
@given(st.integers(-(10**9), 10**9), st.integers(0, 10**9), st.integers(1, 10**6))
def test_hours_affordable(balance_minor: int, rate_num: int, rate_den: int) -> None:
    balance, rate = Fraction(balance_minor, 100), Fraction(rate_num, rate_den)
    hours = hours_affordable(Decimal(balance_minor).scaleb(-2), rate)
    if rate == 0:
        assert hours is None
        return
    assert hours is not None
    assume(balance > 0 or hours == 0)
    assert abs(Fraction(hours) * rate - max(balance, Fraction(0))) < Fraction(1, 10**40)


# -- recurring charges: any sequence of windows ------------------------------------------


@PROPS
@given(
    st.sampled_from(["CNY", "JPY"]),
    st.lists(
        st.tuples(st.integers(0, 10**9), st.integers(1, 3600 * 10**6)).map(
            lambda t: Fraction(t[0], t[1])
        ),
        max_size=60,
    ),
)
def test_running_total_never_drifts(currency: str, windows: list[Fraction]) -> None:
    """Over any sequence of window charges, what was posted after each window is the exact
    total so far rounded once: never more than half a minor unit from it."""
    unit = Fraction(1, 10 ** {"CNY": 2, "JPY": 0}[currency])
    total, exact, posted = RunningTotal(), Fraction(0), 0
    for amount in windows:
        total, delta = total.add(amount, currency)
        exact += amount
        posted += delta
        assert delta >= 0
        assert posted == total.posted_minor == minor_of(exact, currency)
        assert abs(posted * unit - exact) <= unit / 2
        assert RunningTotal.decode(total.encode(), total.posted_minor) == total


def test_running_total_refuses_a_negative_window_and_a_bad_encoding() -> None:
    with pytest.raises(PriceError, match="window charge"):
        RunningTotal().add(Fraction(-1, 100))
    with pytest.raises(PriceError, match="running total"):
        RunningTotal.decode("0.1x", 0)
    assert RunningTotal.decode(None, None) == RunningTotal()
