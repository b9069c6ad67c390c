from __future__ import annotations

from datetime import UTC, datetime

import pytest
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig

T0 = datetime(2026, 1, 1, tzinfo=UTC)


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
