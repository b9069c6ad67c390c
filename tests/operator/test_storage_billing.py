"""Instance storage against the seed (3.1), with prices that do not divide evenly:
settled every hour by quota, posted as the delta of rounded cumulative totals (the sum
of the postings is the exact total rounded once), and charged only once the instance's
volume holds data: from the first time its pod runs, never while it waits for GPUs."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

from gpucloud_operator.rules import parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opworld import NS, T0, World, make_world

from gpucloud.billing import to_minor

L40S = "NVIDIA-L40S"
HOUR = 3600


def _exact(quota: int, price: str, seconds: int) -> Fraction:
    """The oracle: quota x price per GiB-hour x seconds, exactly (no billing code)."""
    return Fraction(price) * quota * seconds / HOUR


def _running(w: World, name: str, quota: int) -> None:
    w.fund(1000_00)
    w.instance(name, L40S, quota=quota)
    w.tick()
    assert w.status(name)["phase"] == "Running"
    assert w.status(name)["storageSince"] == "2026-01-01T00:00:00Z"


def test_hourly_storage_posts_the_exact_total_rounded_once(world: World) -> None:
    """50 GiB at 0.0005/GiB-h is 0.025 an hour: rounding each hour posted 0.02."""
    w = world
    w.price("storage", "instancePerGBHour", "0.0005")
    _running(w, "nb", 50)
    for hour in range(1, 5):
        w.clock.advance(timedelta(hours=1))
        w.tick()
        assert w.storage_charges() == to_minor(_exact(50, "0.0005", hour * HOUR))
    assert w.storage_charges() == 10  # 0.025 + 0.025 + 0.025 + 0.025, not 4 x 0.02
    st = w.status("nb")
    assert st["storageExact"] == "1/10" and st["storagePostedMinor"] == 10


def test_a_small_quota_is_billed_too(world: World) -> None:
    """10 GiB at 0.0005/GiB-h is 0.005 an hour: each hour alone rounds to zero."""
    w = world
    w.price("storage", "instancePerGBHour", "0.0005")
    _running(w, "small", 10)
    w.clock.advance(timedelta(hours=3))
    w.tick()
    assert w.storage_charges() == to_minor(Fraction(15, 1000)) == 2  # 0.015 -> 0.02
    w.clock.advance(timedelta(hours=1))
    w.tick()
    assert w.storage_charges() == 2  # 0.020
    w.clock.advance(timedelta(minutes=30))
    w.rec.release(w.kube.instance(NS, "small"))
    assert w.storage_charges() == to_minor(_exact(10, "0.0005", 4 * HOUR + 1800)) == 2


def test_storage_of_a_package_instance_after_expiry_adds_up(world: World) -> None:
    """Package storage is included in the term; after expiry it is billed hourly, and
    those hours add up to the exact total rounded once as well."""
    w = world
    w.price("storage", "instancePerGBHour", "0.0005")
    w.fund(300_00)
    w.instance("pkg", L40S, quota=30, mode="Package", period="Day")
    w.tick()
    w.clock.advance(timedelta(hours=24))
    w.tick()
    assert w.status("pkg")["phase"] == "Expired" and w.storage_charges() == 0
    for hour in range(1, 4):  # 30 GiB: 0.015 an hour, 0.01 or 0.02 each alone
        w.clock.advance(timedelta(hours=1))
        w.tick()
        assert w.storage_charges() == to_minor(_exact(30, "0.0005", hour * HOUR))
    assert w.storage_charges() == 4  # 0.045 -> 0.04 (half to even), not 3 x 0.02 = 0.06


def test_no_storage_while_waiting_for_gpus(world: World) -> None:
    """An instance placed on a full node waits Pending: its volume holds no data yet, and
    nothing is charged until its pod first runs (docs/operator.md)."""
    w = world
    w.fund(1000_00)
    w.instance("big", L40S, 4)
    w.tick("big")
    assert w.status("big")["phase"] == "Running"
    w.instance("late", L40S, 1)
    w.tick("late")
    st = w.status("late")
    assert st["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in st["message"]
    assert "storageSince" not in st
    w.clock.advance(timedelta(hours=3))
    w.tick("late")
    assert w.status("late")["phase"] == "Pending"
    assert not [e for e in w.ledger.entries("acme") if e.resource == f"{NS}/late"]
    # GPUs free up: the first run starts storage billing at that instant
    w.kube.update_spec("gpuinstances", NS, "big", {"state": "Stopped"})
    w.tick("big")
    w.tick("late")
    st = w.status("late")
    assert st["phase"] == "Running" and st["storageSince"] == "2026-01-01T03:00:00Z"
    w.clock.advance(timedelta(hours=1))
    w.tick("late")
    storage = [e for e in w.ledger.entries("acme") if e.key.startswith("storage:")]
    assert [(e.resource, e.amount_minor) for e in storage if e.resource == f"{NS}/late"] == [
        (f"{NS}/late", -to_minor(_exact(50, "0.0004", HOUR)))
    ]


def test_released_while_pending_costs_nothing(world: World) -> None:
    w = world
    w.fund(1000_00)
    w.instance("big", L40S, 4)
    w.tick("big")
    w.instance("late", L40S, 1)
    w.tick("late")
    w.clock.advance(timedelta(hours=2, minutes=10))
    assert w.rec.release(w.kube.instance(NS, "late"))
    assert not [e for e in w.ledger.entries("acme") if e.resource == f"{NS}/late"]


# -- the oracle: any sequence of settlement instants, any quota ------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    quota=st.integers(1, 200),
    price=st.sampled_from(["0.0005", "0.0004", "0.000333", "0.0123"]),
    steps=st.lists(st.integers(1, 4 * HOUR), min_size=1, max_size=8),
    release_after=st.integers(0, HOUR - 1),
)
def test_storage_postings_follow_the_exact_total_at_every_moment(
    quota: int, price: str, steps: list[int], release_after: int
) -> None:
    """Whatever the quota and however irregularly the operator settles, after each pass
    the storage postings equal the exact charge up to storageBilledUntil rounded once
    (at most half a minor unit from it, never drifting), and at release the exact total
    of the instance's whole life rounded once."""
    with tempfile.TemporaryDirectory() as tmp:
        w = make_world(Path(tmp))
        try:
            w.price("storage", "instancePerGBHour", price)
            w.fund(10**9)
            w.instance("nb", L40S, quota=quota)
            w.tick("nb")
            since = T0
            for seconds in steps:
                w.clock.advance(seconds)
                w.tick("nb")
                st_ = w.status("nb")
                until = parse(st_.get("storageBilledUntil") or st_["storageSince"])
                assert until is not None
                billed = int((until - since).total_seconds())
                exact = _exact(quota, price, billed)
                assert w.storage_charges() == to_minor(exact)
                assert abs(Fraction(w.storage_charges(), 100) - exact) <= Fraction(1, 200)
            w.clock.advance(release_after)
            assert w.rec.release(w.kube.instance(NS, "nb")) in (True, False)
            life = int((w.clock.now() - since).total_seconds())
            assert w.storage_charges() == to_minor(_exact(quota, price, life))
        finally:
            w.ledger.close()


def test_a_repeated_pass_after_a_price_change_adopts_what_was_posted(world: World) -> None:
    """A pass killed after its postings but before its status patch repeats the same
    windows. Should the price change in between, the window's key is already posted
    with other figures: the ledger's entry (and the running total it recorded) wins,
    nothing is charged twice."""
    w = world
    w.price("storage", "instancePerGBHour", "0.0005")
    _running(w, "nb", 50)
    before = dict(w.status("nb"))
    w.clock.advance(timedelta(hours=2))
    w.tick("nb")
    assert w.storage_charges() == 5  # 0.05
    st = w.kube.instance(NS, "nb")["status"]
    for key in ("storageBilledUntil", "storageExact", "storagePostedMinor"):  # patch lost
        st.pop(key, None)
        if key in before:
            st[key] = before[key]
    w.restart()
    w.price("storage", "instancePerGBHour", "0.0004")
    w.tick("nb")
    assert w.storage_charges() == 5  # the two hours were not charged again
    assert w.status("nb")["storagePostedMinor"] == 5
    assert w.status("nb")["storageExact"] == "1/20"
    w.clock.advance(timedelta(hours=1))
    w.tick("nb")  # the new price from the next hour on: 0.05 + 0.02
    assert w.storage_charges() == 7
