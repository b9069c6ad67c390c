from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
import yaml
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from opworld import ROOT

from gpucloud.billing import RunningTotal
from gpucloud.crd.pricebook import price_book

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
    with pytest.raises(ValueError, match="metering_grace_s: Input should be a valid integer"):
        OperatorConfig.from_env({"GPUCLOUD_OPERATOR_METERING_GRACE_S": "soon"})
    with pytest.raises(ValueError, match="tick_interval_s: Input should be greater than 0"):
        OperatorConfig().with_overrides({"tick_interval_s": "0"})
    with pytest.raises(ValueError, match="unknown operator setting"):
        OperatorConfig().with_overrides({"nope": 1})


PRICES = {"Day": 112_00, "Week": 700_00, "Month": 2800_00}  # L40S, examples/pricebook.yaml


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Pending", "Starting", "Running", "Stopped", "Refused", None]),
            st.sampled_from(["PayAsYouGo", "Spot", "Day", "Week", "Month"]),
            st.booleans(),  # autoRenew
            st.lists(st.integers(-100, 100), max_size=3),  # term ends, hours from now
            st.integers(1, 4),  # GPUs
            st.booleans(),  # in the account's namespace
        ),
        max_size=8,
    )
)
def test_reservations_against_a_plain_oracle(instances: list[tuple]) -> None:
    """What an account has committed but not been charged: an admitted package start
    without a term covering now (its term), a running auto-renewing package whose term
    ended (its renewal). Nothing else, and only the account's own namespaces."""
    pb = price_book(yaml.safe_load((ROOT / "examples/pricebook.yaml").read_text()))
    objs, expected = [], 0
    for i, (phase, mode, renew, ends, gpus, mine) in enumerate(instances):
        package = mode in PRICES
        billing = {"mode": "Package", "period": mode} if package else {"mode": mode}
        terms = [
            {
                "seq": n + 1,
                "period": mode,
                "start": r.fmt(T0 + timedelta(hours=e - 24)),
                "end": r.fmt(T0 + timedelta(hours=e)),
                "prepaidMinor": 1,
            }
            for n, e in enumerate(sorted(ends))
        ]
        status = {"phase": phase, "packageTerms": terms} if phase else {}
        if package and phase == "Running":
            status["billingMode"] = f"Package/{mode}"
        objs.append(
            {
                "metadata": {"uid": f"u{i}", "namespace": "team-a" if mine else "other"},
                "spec": {
                    "gpu": {"product": "NVIDIA-L40S", "count": gpus},
                    "billing": {**billing, "autoRenew": renew and package},
                },
                "status": status,
            }
        )
        last = sorted(ends)[-1] if ends else None
        covered = last is not None and last - 24 <= 0 < last
        if not (mine and package):
            continue
        if (phase in ("Pending", "Starting") and not covered) or (
            phase == "Running" and renew and last is not None and last <= 0
        ):
            expected += PRICES[mode] * gpus
    got = r.reservations(objs, {"team-a"}, pb, T0)
    assert sum(res.minor for res in got.values()) == expected
    for uid, res in got.items():
        seq = len(next(o for o in objs if o["metadata"]["uid"] == uid)["status"]["packageTerms"])
        assert res.key == f"package:{uid}:{seq + 1}"


def test_storage_hours_that_sum_to_a_half_fen_tie_post_the_tie_rounded_once() -> None:
    """The example hypothesis found: 430 GiB at 9.80/GiB-h for 1,161 s across an hour
    edge is exactly 1359.015 CNY; the hours' Decimals summed to a hair under it and
    posted 1359.01. The exact windows post 1359.02 (half to even)."""
    spec = yaml.safe_load((ROOT / "examples" / "pricebook.yaml").read_text())["spec"]
    spec["storage"]["instancePerGBHour"] = "9.80"
    pb = price_book(spec)
    edge = datetime(2026, 1, 1, 1, tzinfo=UTC)
    lo, hi = edge - timedelta(seconds=4751), edge - timedelta(seconds=4751 - 1161)
    total, posted = RunningTotal(), 0
    for window in r.storage_windows(lo, hi, 3600):
        total, delta = total.add(r.storage_window_exact(pb, 430, window, []), "CNY")
        posted += delta
    assert total.exact == Fraction(271803, 200)
    assert posted == 135902
