from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucloud.billing import to_minor

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def view(seconds: int, rated: int, posted: int, gpus: int = 2) -> r.MeterView:
    return r.MeterView(
        Decimal("5.20"),
        gpus,
        T0,
        datetime.fromtimestamp(T0.timestamp() + seconds, UTC),
        rated,
        posted,
    )


def test_fallback_bills_only_unmetered_seconds() -> None:
    assert r.fallback_charge(view(1000, 0, 0), "CNY") == (289, 2000)
    # half metered and posted by the meter: the rest makes the total the exact one
    half = to_minor(Decimal("5.20") * 1000 / 3600)
    amount, missing = r.fallback_charge(view(1000, 1000, half), "CNY")
    assert missing == 1000 and half + amount == 289
    assert r.fallback_charge(view(1000, 2000, 289), "CNY") == (0, 0)


@settings(max_examples=200)
@given(st.integers(0, 10**6), st.integers(0, 100), st.integers(1, 8))
def test_fallback_total_is_the_exact_run_cost_rounded_once(
    seconds: int, pct: int, gpus: int
) -> None:
    total = gpus * seconds
    rated = total * pct // 100
    posted = to_minor(Decimal("5.20") * rated / 3600)
    amount, _ = r.fallback_charge(view(seconds, rated, posted, gpus), "CNY")
    assert posted + amount == to_minor(Decimal("5.20") * total / 3600)


def test_storage_windows_are_aligned_and_clipped() -> None:
    start = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    end = datetime(2026, 1, 1, 2, 15, tzinfo=UTC)
    windows = list(r.storage_windows(start, end, 3600))
    assert [(a.hour, a.minute, b.hour, b.minute) for a, b in windows] == [
        (0, 30, 1, 0),
        (1, 0, 2, 0),
        (2, 0, 2, 15),
    ]


def test_billing_keys_and_reminder() -> None:
    assert r.billing_key({"mode": "Package", "period": "Week"}) == "Package/Week"
    assert r.billing_key({"mode": "Spot"}) == "Spot"
    from datetime import timedelta

    lead = timedelta(days=7)
    assert r.reminder_due(T0, T0 + timedelta(days=7), lead)
    assert not r.reminder_due(T0, T0 + timedelta(days=7, seconds=1), lead)
    assert not r.reminder_due(T0, T0, lead)


def test_config_from_env_and_errors() -> None:
    cfg = OperatorConfig.from_env(
        {
            "GPUCLOUD_LEDGER_URL": "sqlite:///x.db",
            "GPUCLOUD_OPERATOR_METERING_GRACE_S": "5",
            "GPUCLOUD_OPERATOR_PACKAGE_DAY_S": "60",
            "GPUCLOUD_OPERATOR_TICK_INTERVAL_S": "0.5",
        }
    )
    assert cfg.ledger_url == "sqlite:///x.db" and cfg.metering_grace_s == 5
    assert cfg.package_length("day").total_seconds() == 60 and cfg.tick_interval_s == 0.5
    assert OperatorConfig().package_length("month").total_seconds() == 30 * 24 * 3600
    with pytest.raises(ValueError, match="metering_grace_s: 'soon' is not an integer"):
        OperatorConfig.from_env({"GPUCLOUD_OPERATOR_METERING_GRACE_S": "soon"})
    with pytest.raises(ValueError, match="tick_interval_s: must be > 0"):
        OperatorConfig().with_overrides({"tick_interval_s": "0"})
    with pytest.raises(ValueError, match="unknown operator setting"):
        OperatorConfig().with_overrides({"nope": 1})
