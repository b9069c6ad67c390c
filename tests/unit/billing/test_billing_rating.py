from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from billing_oracles import A100, H100, sample_pricebook

from gpucloud.billing import (
    GIB,
    BillingError,
    BillingMode,
    InstanceLoad,
    ModelLoad,
    NotOffered,
    PackagePeriod,
    UnknownProduct,
    burn_rate_per_hour,
    cloud_disk_charge,
    estimate,
    gpu_cost,
    hour_windows,
    hours_affordable,
    image_charge,
    instance_storage_charge,
    model_online_charge,
    official_model_charge,
    personal_model_charge,
    to_minor,
)

PB = sample_pricebook()
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_gpu_cost_hand_worked() -> None:
    # 2 x A100 for 1 h 30 min at 9.80 -> 29.40; spot at 3.90 -> 11.70
    assert gpu_cost(PB, A100, 5400, 2) == Decimal("29.4")
    assert gpu_cost(PB, A100, 5400, 2, BillingMode.SPOT) == Decimal("11.7")
    # one second at 9.80/h = 0.00272222...; 7 s rounds to 0.02 (0.019055...)
    assert to_minor(gpu_cost(PB, A100, 7)) == 2
    assert gpu_cost(PB, A100, 0, 8) == 0
    assert gpu_cost(PB, A100, 3600) == Decimal("9.80")


def test_gpu_cost_refuses_bad_input() -> None:
    with pytest.raises(UnknownProduct):
        gpu_cost(PB, "T4", 1)
    with pytest.raises(NotOffered):
        gpu_cost(PB, H100, 1, 1, BillingMode.SPOT)
    with pytest.raises(BillingError, match="gpu_count must be >= 1"):
        gpu_cost(PB, A100, 1, 0)
    with pytest.raises(BillingError, match="seconds must be an int"):
        gpu_cost(PB, A100, 1.5)  # type: ignore[arg-type]
    with pytest.raises(BillingError, match="seconds must be >= 0"):
        gpu_cost(PB, A100, -1)


def test_instance_storage_hour_by_quota_minus_package_coverage() -> None:
    hour = (T0, T0 + timedelta(hours=1))
    # 100 GiB for a full hour at 0.0004 -> 0.04, running or not
    assert instance_storage_charge(PB, 100, *hour) == Decimal("0.04")
    # a package term ends 15 minutes into the hour: 45 min billed -> 0.03
    term = (T0 - timedelta(days=1), T0 + timedelta(minutes=15))
    assert instance_storage_charge(PB, 100, *hour, [term]) == Decimal("0.03")
    # a renewal starting at the expiry covers the rest: nothing billed
    renewal = (term[1], term[1] + timedelta(days=1))
    assert instance_storage_charge(PB, 100, *hour, [term, renewal]) == 0
    # overlapping terms count once; a term outside the hour changes nothing
    assert instance_storage_charge(PB, 100, *hour, [term, term]) == Decimal("0.03")
    outside = (T0 + timedelta(hours=2), T0 + timedelta(hours=3))
    assert instance_storage_charge(PB, 100, *hour, [outside]) == Decimal("0.04")
    # integer POSIX seconds work the same
    start = int(T0.timestamp())
    assert instance_storage_charge(PB, 100, start, start + 3600, [(start, start + 900)]) == Decimal(
        "0.03"
    )
    # a partial window (released 10 minutes in)
    assert instance_storage_charge(PB, 60, T0, T0 + timedelta(minutes=10)) == Decimal("0.004")


def test_instance_storage_refuses_naive_or_reversed_windows() -> None:
    with pytest.raises(BillingError, match="timezone-aware"):
        instance_storage_charge(PB, 1, datetime(2026, 1, 1), datetime(2026, 1, 1, 1))
    with pytest.raises(BillingError, match="ends before it starts"):
        instance_storage_charge(PB, 1, T0, T0 - timedelta(seconds=1))


def test_hour_windows_clip_to_clock_hours() -> None:
    windows = list(hour_windows(T0 + timedelta(minutes=20), T0 + timedelta(hours=2, minutes=5)))
    assert windows == [
        (T0 + timedelta(minutes=20), T0 + timedelta(hours=1)),
        (T0 + timedelta(hours=1), T0 + timedelta(hours=2)),
        (T0 + timedelta(hours=2), T0 + timedelta(hours=2, minutes=5)),
    ]
    assert list(hour_windows(T0, T0)) == []


def test_cloud_disk_and_image_per_gib_hour_of_used_bytes() -> None:
    # 10 GiB used for 1 h at 0.0003 -> 0.003; 512 MiB for 2 h at 0.0002 -> 0.0002
    assert cloud_disk_charge(PB, 10 * GIB * 3600) == Decimal("0.003")
    assert image_charge(PB, (GIB // 2) * 7200) == Decimal("0.0002")
    assert cloud_disk_charge(PB, 0) == 0


def test_models() -> None:
    # 1500 tokens -> 0.003; 2 images -> 0.16; 1 video -> 1.20
    assert official_model_charge(PB, tokens=1500) == Decimal("0.003")
    assert official_model_charge(PB, tokens=1500, images=2, videos=1) == Decimal("1.363")
    # personal public: only request runtimes: 250 ms + 1750 ms = 2 s at 0.0030 -> 0.006
    assert personal_model_charge(PB, [250, 1750]) == Decimal("0.006")
    assert personal_model_charge(PB, []) == 0
    # private model: 2 replicas online 1 h and 30 min, 2 GPUs each, 9.80 -> 29.40
    assert model_online_charge(PB, A100, 2, [3600, 1800]) == Decimal("29.4")
    # H100 has no modelOnlinePerHour: its pay-as-you-go price is used
    assert model_online_charge(PB, H100, 1, [3600]) == Decimal("19.99")
    with pytest.raises(BillingError, match="request runtime"):
        personal_model_charge(PB, [-1])


def test_burn_rate_and_hours_affordable() -> None:
    instances = [
        InstanceLoad(A100, 2, BillingMode.PAY_AS_YOU_GO, running=True, storage_gib=50),
        InstanceLoad(A100, 1, BillingMode.SPOT, running=False, storage_gib=100),
        InstanceLoad(
            A100, 4, BillingMode.PACKAGE, running=True, storage_gib=200, package_active=True
        ),
        InstanceLoad(A100, 1, BillingMode.PACKAGE, running=False, storage_gib=10),
    ]
    rate = burn_rate_per_hour(
        PB,
        instances,
        cloud_disk_bytes=100 * GIB,
        image_bytes=50 * GIB,
        models=[ModelLoad(A100, 1, 2)],
    )
    # GPUs 19.60 + storage (50+100+10) GiB x 0.0004 = 0.064 + disk 0.03 + image 0.01
    # + model 2 x 9.80 = 19.60
    assert rate == Decimal("39.304")
    assert hours_affordable(Decimal("39.304"), rate) == 1
    assert hours_affordable(Decimal("19.652"), rate) == Decimal("0.5")
    assert hours_affordable(Decimal("-5"), rate) == 0
    assert hours_affordable(Decimal("5"), 0) is None
    assert burn_rate_per_hour(PB) == 0


def test_estimate_for_the_cli() -> None:
    est = estimate(PB, A100, 2, 50)
    assert est.pay_as_you_go_per_hour == Decimal("19.6")
    assert est.spot_per_hour == Decimal("7.8")
    assert est.storage_per_hour == Decimal("0.02")
    assert est.packages == {
        PackagePeriod.DAY: Decimal("398"),
        PackagePeriod.WEEK: Decimal("2398"),
        PackagePeriod.MONTH: Decimal("9198"),
    }
    assert est.hours_affordable(Decimal("196.2")) == 10
    assert est.hours_affordable(Decimal("78.2"), BillingMode.SPOT) == 10
    h100 = estimate(PB, H100)
    assert h100.spot_per_hour is None and h100.packages == {}
    with pytest.raises(BillingError, match="spot is not offered"):
        h100.hours_affordable(Decimal(1), BillingMode.SPOT)
