"""What the console shows as text: pure functions, time injected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpucloud.api.console import present

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "less than a minute"),
        (59, "less than a minute"),
        (60, "1 min"),
        (3600, "1 h"),
        (6 * 3600 + 20 * 60 + 59, "6 h 20 min"),
        (47 * 3600 + 59 * 60, "47 h 59 min"),
        (48 * 3600, "2 d"),
        (3 * 86400 + 4 * 3600 + 30 * 60, "3 d 4 h"),
        (2124 * 86400 + 9 * 3600, "5 y 299 d"),
    ],
)
def test_duration_text(seconds: int, text: str) -> None:
    assert present.duration_text(seconds) == text


def test_runway_is_the_billing_cores_hours_at_the_published_rate() -> None:
    # 125.40 CNY at 19.80 CNY/h: 6.3333... h = 6 h 20 min (never rounded up)
    assert present.runway_text(125_40, "CNY", "19.80") == (
        "lasts about 6 h 20 min at the current rate (19.80 CNY per hour)"
    )
    # a rate that does not divide evenly, exact to the published digits
    assert present.runway_text(1_00, "CNY", "0.0004").startswith("lasts about 104 d 4 h")
    assert present.runway_text(0, "CNY", "19.80").startswith("nothing left")
    assert present.runway_text(-5_00, "CNY", "19.80").startswith("nothing left")
    assert present.runway_text(1_00, "CNY", "0") == "nothing is billed by the hour now"
    # JPY has no minor unit: 100 yen at 30/h
    assert present.runway_text(100, "JPY", "30").startswith("lasts about 3 h 20 min")


@pytest.mark.parametrize("rate", [None, "", "abc", "-1", "NaN", "Infinity", 5])
def test_runway_without_a_usable_rate_says_so(rate: object) -> None:
    assert present.runway_text(100_00, "CNY", rate).startswith("unknown")


def test_retention_countdown_runs_to_the_operators_deletion_date() -> None:
    due = NOW + timedelta(days=6, hours=23, minutes=30)
    status = {"state": "Arrears", "arrearsSince": "2026-03-01T11:30:00Z",
              "dataDeletionAt": due.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    assert present.retention_text(status, NOW) == (
        "data is deleted in 6 d 23 h (at 2026-03-08 11:30 UTC) unless the debt is cleared"
    )
    assert present.retention_text(status, due).startswith("data deletion was due")
    assert present.retention_text({**status, "state": "Active"}, NOW) == ""
    assert present.state_text(status) == (
        "Arrears since 2026-03-01 11:30 UTC: instances are shut down"
    )
    assert present.state_text({}).startswith("unknown")
    assert present.state_text({"state": "LowBalance"}).startswith("Low balance")


def test_instance_and_model_rows_take_cost_from_the_ledger() -> None:
    inst = {
        "metadata": {"name": "train", "namespace": "ns"},
        "spec": {"gpu": {"product": "NVIDIA-L40S", "count": 2},
                 "billing": {"mode": "Package", "period": "Month"}},
    }  # fmt: skip
    row = present.instance_row(inst, {"ns/train": 12_34, "ns/other": 1}, "CNY")
    assert row == {"name": "ns/train", "state": "Pending", "gpus": "2 × NVIDIA-L40S",
                   "mode": "package (month)", "cost": "12.34 CNY"}  # fmt: skip
    inst["status"] = {"phase": "Running", "billingMode": "Spot"}
    assert present.instance_row(inst, {}, "CNY")["mode"] == "spot"
    md = {
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"gpu": {"product": "NVIDIA-L40S"}, "visibility": "Public",
                 "pricing": {"publisher": "Official", "task": "TextGeneration"}},
        "status": {"state": "Serving", "replicas": 2, "readyReplicas": 1},
    }  # fmt: skip
    costs = {"model/ns/chat": 5, "model/ns/chat#online": 1_00, "model/ns/chatty": 7}
    assert present.model_row(md, costs, "CNY") == {
        "name": "ns/chat", "state": "Serving", "gpus": "1/2 replicas of 1 × NVIDIA-L40S",
        "mode": "public: per token", "cost": "1.05 CNY",
    }  # fmt: skip
    assert present.model_mode({}) == "private: online time"
