"""Meters: usage becomes charges, the delta of the rounded cumulative total."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0, T0_S, disk_record, gpu_record

from gpucloud.billing.money import to_minor
from gpucloud.ledger import IdempotencyConflict, InvalidInput, Ledger, NotFound, Unposted
from gpucloud.usage import UsageKind

LATER = T0 + timedelta(days=1)


def _gpu_meter(ledger: Ledger, meter_id: str = "m1", price: str = "1.23", **kw: object) -> None:
    ledger.ensure_account("alice")
    args: dict[str, object] = {
        "account": "alice",
        "resource": "team-a/inst-1",
        "kind": "gpu_time",
        "subject": "pod-1",
        "unit_price": Decimal(price),
        "unit": "gpu_hour",
        "opened_at": T0,
    }
    args.update(kw)
    ledger.open_meter(meter_id, **args)  # type: ignore[arg-type]


def test_charges_are_deltas_of_rounded_cumulative(ledger: Ledger) -> None:
    _gpu_meter(ledger)
    for i in range(100):
        ledger.ingest_usage([gpu_record(T0_S + 10 * i)], received_at=T0)
        assert ledger.rate_pending(LATER) == 1
    exact = Fraction(1000) * Fraction("1.23") / 3600  # 0.341666... yuan
    assert ledger.balance("alice") == -to_minor(exact) == -34
    charges = ledger.entries("alice", limit=1000)
    assert [e.key for e in charges] == [f"meter:m1:{n}" for n in range(1, len(charges) + 1)]
    assert sum(e.amount_minor for e in charges) == ledger.entries_sum("alice") == -34
    meter = ledger.get_meter("m1")
    assert (meter.quantity_rated, meter.posted_minor, meter.seq) == (1000, 34, len(charges))
    assert ledger.rate_pending(LATER) == 0  # nothing left: idempotent
    assert ledger.charges_by_resource("alice") == {"team-a/inst-1": 34}


def test_exact_halves_round_to_even_once(ledger: Ledger) -> None:
    # 1.80 per GPU-hour = 0.05 fen per second: each 10 s window is exactly half a fen.
    _gpu_meter(ledger, price="1.80")
    posted = []
    for i in range(5):
        ledger.ingest_usage([gpu_record(T0_S + 10 * i)], received_at=T0)
        ledger.rate_pending(LATER)
        posted.append(-ledger.balance("alice"))
    assert posted == [0, 1, 2, 2, 2]  # 0.5->0, 1.0->1, 1.5->2, 2.0->2, 2.5->2 (half even)


def test_usage_without_meter_stays_unrated_and_uncharged(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.ingest_usage([gpu_record(T0_S, pod_uid="stray")], received_at=T0)
    assert ledger.rate_pending(LATER) == 0
    assert [u.owner for u in ledger.unrated_usage()] == ["stray"]
    assert ledger.balance("alice") == 0
    # Usage from before a meter opened is not the meter's either.
    _gpu_meter(ledger, subject="stray", opened_at=T0 + timedelta(seconds=60))
    assert ledger.rate_pending(LATER) == 0
    assert len(ledger.unrated_usage()) == 1


def test_closed_meter_rates_only_inside_its_interval(ledger: Ledger) -> None:
    _gpu_meter(ledger, price="36")  # 1 fen per GPU-second
    ledger.ingest_usage([gpu_record(T0_S + 10 * i) for i in range(4)], received_at=T0)
    closed = ledger.close_meter("m1", T0 + timedelta(seconds=25.7))
    assert closed.closed_at == T0 + timedelta(seconds=25.7)
    assert ledger.close_meter("m1", LATER).closed_at == closed.closed_at  # idempotent
    assert ledger.rate_pending(LATER) == 3
    assert ledger.balance("alice") == -25  # [0, 25): the partial window is clipped
    left = [(u.start, u.rated_until) for u in ledger.unrated_usage()]
    assert left == [(T0_S + 20, T0_S + 25), (T0_S + 30, T0_S + 30)]
    # A successor meter from the close time on picks up the rest, no second lost or doubled.
    _gpu_meter(ledger, "m2", price="36", opened_at=T0 + timedelta(seconds=25.7))
    assert ledger.rate_pending(LATER) == 2
    assert ledger.balance("alice") == -40


def test_disk_meter_prices_byte_seconds_per_gib_hour(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.open_meter(
        "d1",
        account="alice",
        resource="team-a/disk-1",
        kind="cloud_disk",
        subject="disk-1",
        unit_price=Decimal("0.5"),
        unit="gb_hour",
        opened_at=T0,
    )
    ledger.ingest_usage([disk_record(T0_S, 3600, 3 * 2**30)], received_at=T0)
    ledger.ingest_usage([disk_record(T0_S + 3600, 1800, 2**29)], received_at=T0)
    assert ledger.rate_pending(LATER) == 2
    # 3 GiB x 1 h x 0.5 + 0.5 GiB x 0.5 h x 0.5 = 1.625 yuan -> 162.5 fen -> 162 (even)
    assert ledger.balance("alice") == -162


def test_rating_waits_for_usage_to_end_by_now(ledger: Ledger) -> None:
    _gpu_meter(ledger)
    ledger.ingest_usage([gpu_record(T0_S), gpu_record(T0_S + 10)], received_at=T0)
    assert ledger.rate_pending(T0 + timedelta(seconds=10)) == 1
    assert ledger.rate_pending(T0 + timedelta(seconds=20)) == 1


def test_open_meter_rules(ledger: Ledger) -> None:
    _gpu_meter(ledger)
    _gpu_meter(ledger)  # the same terms again: idempotent
    with pytest.raises(IdempotencyConflict, match="meter:m1"):
        _gpu_meter(ledger, price="2")
    with pytest.raises(InvalidInput, match="already has open meter 'm1'"):
        _gpu_meter(ledger, "m2")
    with pytest.raises(InvalidInput, match="unit: a gpu_time meter is priced per gpu_hour"):
        _gpu_meter(ledger, "m3", subject="p3", unit="gb_hour")
    with pytest.raises(InvalidInput, match="unit_price: must be an exact Decimal"):
        _gpu_meter(ledger, "m4", subject="p4", unit_price=1.5)
    with pytest.raises(InvalidInput, match="kind: 'gpu' is not one of"):
        _gpu_meter(ledger, "m5", subject="p5", kind="gpu")
    with pytest.raises(InvalidInput, match=r"at: .* is before the meter opened"):
        ledger.close_meter("m1", T0 - timedelta(seconds=1))
    with pytest.raises(NotFound, match="meter 'nope'"):
        ledger.close_meter("nope", T0)
    assert [m.meter_id for m in ledger.meters("alice", open_only=True)] == ["m1"]


def test_meters_newest_first_up_to_a_limit(ledger: Ledger) -> None:
    for n in range(3):
        opened = T0 + timedelta(minutes=n)
        _gpu_meter(ledger, f"m{n}", subject=f"pod-{n}", opened_at=opened)
    assert [m.meter_id for m in ledger.meters("alice")] == ["m0", "m1", "m2"]
    assert [m.meter_id for m in ledger.meters("alice", newest=2)] == ["m2", "m1"]
    with pytest.raises(InvalidInput, match="newest"):
        ledger.meters("alice", newest=0)


def test_accrued_unsettled_and_available_balance(ledger: Ledger) -> None:
    _gpu_meter(ledger, price="36", gpus=2)  # 1 fen per GPU-second, 2 GPUs
    ledger.post_entry("alice", "recharge", 100_000, "r", at=T0)
    now = T0 + timedelta(seconds=100)
    assert ledger.accrued_unsettled("alice", now) == 200
    batch = [gpu_record(T0_S + 10 * i, gpu=g) for i in range(5) for g in ("GPU-a", "GPU-b")]
    ledger.ingest_usage(batch, received_at=T0)
    # 100 GPU-s ingested (unrated) + 2 GPUs x 50 s since the last usage ended.
    assert ledger.accrued_unsettled("alice", now) == 200
    ledger.rate_pending(now)
    assert ledger.balance("alice") == 100_000 - 100
    assert ledger.accrued_unsettled("alice", now) == 100
    assert ledger.available_balance("alice", now) == 100_000 - 200
    ledger.close_meter("m1", now)
    # a stopped run owes its window until it is settled, however late it is asked
    later = now + timedelta(hours=1)
    assert ledger.unposted("alice", later) == Unposted(open_minor=0, closed_minor=100)
    assert ledger.available_balance("alice", later) == 100_000 - 200
    ledger.settle_meter("m1", later, fallback=True)
    assert ledger.balance("alice") == 100_000 - 200
    assert ledger.accrued_unsettled("alice", later) == 0
    assert ledger.available_balance("alice", later, reserved_minor=50) == 100_000 - 250


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    price=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99"), places=2),
    windows=st.lists(st.tuples(st.integers(1, 10), st.booleans()), min_size=1, max_size=30),
)
def test_any_rating_schedule_posts_the_total_rounded_once(
    ledger: Ledger, price: Decimal, windows: list[tuple[int, bool]]
) -> None:
    meter_id = f"p{abs(hash((price, tuple(windows))))}"
    pod = f"pod-{meter_id}"
    ledger.ensure_account(meter_id)
    ledger.open_meter(
        meter_id,
        account=meter_id,
        resource="r",
        kind="gpu_time",
        subject=pod,
        unit_price=price,
        unit="gpu_hour",
        opened_at=T0,
    )
    start = T0_S
    for length, rate_now in windows:
        ledger.ingest_usage(
            [gpu_record(start, length, gpu=f"GPU-{meter_id}", pod_uid=pod)], received_at=T0
        )
        start += length
        if rate_now:
            ledger.rate_pending(LATER)
    ledger.rate_pending(LATER)
    total = sum(length for length, _ in windows)
    assert ledger.balance(meter_id) == -to_minor(Fraction(total) * Fraction(price) / 3600)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["cloud_disk", "image"]),
    price=st.sampled_from(["0.0005", "0.0003", "0.000333"]),
    hours=st.lists(
        st.tuples(st.integers(0, 300 * 2**30), st.integers(1, 3600), st.booleans()),
        min_size=1,
        max_size=24,
    ),
)
def test_disk_and_image_hours_post_the_exact_total_rounded_once(
    ledger: Ledger, kind: str, price: str, hours: list[tuple[int, int, bool]]
) -> None:
    """Cloud disks and images are measured hour by hour (used bytes); whichever hours are
    rated when, the postings after each rating are the exact charge of the usage rated so
    far rounded once: never a fen lost per hour, never drifting (0.0005/GiB-h)."""
    meter_id = f"{kind}-{abs(hash((price, tuple(hours))))}"
    ledger.ensure_account(meter_id)
    ledger.open_meter(
        meter_id,
        account=meter_id,
        resource=f"team-a/{meter_id}",
        kind=kind,
        subject=meter_id,
        unit_price=Decimal(price),
        unit="gb_hour",
        opened_at=T0,
    )
    start, rated = T0_S, Fraction(0)
    usage = UsageKind.CLOUD_DISK if kind == "cloud_disk" else UsageKind.IMAGE
    for used, seconds, rate_now in hours:
        ledger.ingest_usage(
            [disk_record(start, seconds, used, volume=meter_id, kind=usage)], received_at=T0
        )
        start += seconds
        if rate_now:
            ledger.rate_pending(LATER)
            rated = Fraction(ledger.get_meter(meter_id).quantity_rated)
            exact = rated * Fraction(price) / (3600 * 2**30)
            assert -ledger.balance(meter_id) == to_minor(exact)
    ledger.rate_pending(LATER)
    byte_seconds = sum(used * seconds for used, seconds, _ in hours)
    exact = Fraction(byte_seconds) * Fraction(price) / (3600 * 2**30)
    assert -ledger.balance(meter_id) == to_minor(exact)
