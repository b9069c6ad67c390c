"""Budgets and runway notices end to end: the operator process on the test bed, a real
SQLite ledger, a file clock and a real webhook server. An H100 costs 19.80/h and its
50 GiB quota 0.02/h; a budget of 79.99 does not divide into either.

1. A running instance takes its account past 50%, 80% and 100% of the month's budget:
   each notice once (webhook, Event, condition), the Budget% column and the metrics
   follow, and then a new start is refused with a condition naming account, budget and
   spent.
2. A runway episode: notices at 24 h, 3 h and 1 h of runway, once each; a recharge ends
   the episode and the next fall below 24 h notices again."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opharness import Harness

from gpucloud.testing.kube import get_json
from gpucloud.testing.net import free_port
from gpucloud.testing.testbed import Testbed
from gpucloud.testing.webhook import Hook

pytestmark = pytest.mark.e2e

H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture
def bed(testbed: Testbed, namespace: str, tmp_path: Path, hook: Hook) -> Iterator[Harness]:
    h = Harness(testbed, namespace, tmp_path, webhook_url=hook.url, metrics_port=free_port())
    h.setup()
    yield h
    h.close()


def account(h: Harness) -> dict[str, Any]:
    return get_json(h.tb, "account", h.account).get("status") or {}


def patch_account(h: Harness, spec: dict[str, Any]) -> None:
    h.tb.kubectl("patch", "account", h.account, "--type=merge", "-p", json.dumps({"spec": spec}))


def account_events(h: Harness) -> list[str]:
    out = get_json(
        h.tb, "events", "-n", "default", "--field-selector", f"involvedObject.name={h.account}"
    )
    return [e["reason"] for e in out["items"]]


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions") or [] if c["type"] == type_)


def metrics(h: Harness) -> str:
    port = h.settings["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_budget_tiers_once_each_then_a_start_is_refused(bed: Harness, hook: Hook) -> None:
    h = bed
    h.fund(1000_00)
    patch_account(h, {"budget": {"monthly": "79.99"}})
    h.start()
    h.instance("train", H100)
    h.wait_phase("train", "Running")
    h.wait(lambda: (account(h).get("budget") or {}).get("state") == "Ok", "the budget status")

    def percent_at_least(p: int) -> dict[str, Any] | None:
        b = account(h).get("budget") or {}
        return b if b.get("percent", -1) >= p else None

    # 2 h: 39.60 + 0.04 storage = 39.64, 49%: nothing yet
    h.advance(2 * 3600)
    b = h.wait(lambda: percent_at_least(49), "49% of the budget")
    assert b["percent"] == 49 and b["state"] == "Ok" and not hook.of_type("budget.threshold")
    # 2 h 10 min: 42.94, 53%: the 50% notice
    h.advance(600)
    h.wait(lambda: hook.of_type("budget.threshold"), "the 50% webhook")
    # 3 h 15 min: 64.41, 80%: the 80% notice
    h.advance(65 * 60)
    h.wait(lambda: len(hook.of_type("budget.threshold")) == 2, "the 80% webhook")
    # 4 h 05 min: 80.93, 101%: exceeded
    h.advance(50 * 60)
    h.wait(lambda: hook.of_type("budget.exceeded"), "the exceeded webhook")
    st = h.wait(lambda: (account(h)["budget"]["state"] == "Exceeded") and account(h), "Exceeded")
    assert [m["percent"] for m in hook.of_type("budget.threshold")] == [50, 80]
    (exceeded,) = hook.of_type("budget.exceeded")
    assert exceeded["account"] == h.account and exceeded["monthly"] == "79.99"
    assert exceeded["month"] == "2026-01" and exceeded["enforcement"] == "RefuseStarts"
    assert condition(st, "BudgetExceeded")["status"] == "True"
    assert condition(st, "BudgetWarning")["reason"] == "Reached80Percent"
    # more passes (the clock moves on a little) send nothing again
    spent = st["budget"]["spent"]
    h.advance(120)
    h.wait(lambda: account(h)["budget"]["spent"] != spent, "another account pass")
    assert [m["type"] for m in hook.received if m["type"].startswith("budget.")] == [
        "budget.threshold", "budget.threshold", "budget.exceeded",
    ]  # fmt: skip
    events = account_events(h)
    assert events.count("BudgetWarning") == 2 and events.count("BudgetExceeded") == 1
    table = h.tb.kubectl("get", "account", h.account).stdout.splitlines()
    shown = account(h)["budget"]["percent"]  # the clock stands still: so does the figure
    assert "BUDGET%" in table[0].split() and table[1].split()[-2] == str(shown) and shown > 100
    # a new start would take the month further past the budget: refused, nothing charged
    h.instance("more", H100)
    more = h.wait_phase("more", "Refused")
    ready = condition(more, "Ready")
    assert ready["reason"] == "BudgetExceeded"
    assert f"the budget of account '{h.account}' would be exceeded: spent " in ready["message"]
    assert "CNY of 79.99 CNY in 2026-01" in ready["message"]
    assert f"one hour of {h.ns}/more adds 19.82 CNY" in ready["message"]
    assert "BudgetExceeded" in h.events("more") and h.pod("more") is None
    assert h.status("train")["phase"] == "Running"  # RefuseStarts: the running one runs on
    text = metrics(h)
    assert f'gpucloud_budget_refusals_total{{account="{h.account}"}} 1.0' in text
    ratio = next(
        line for line in text.splitlines()
        if line.startswith("gpucloud_account_budget_spent_ratio") and h.account in line
    )  # fmt: skip
    assert float(ratio.split()[-1]) > 1


def test_runway_notices_24_3_1_once_each_and_again_after_a_recharge(
    bed: Harness, hook: Hook
) -> None:
    h = bed
    h.fund(594_60)  # 30 h of an H100 with its storage, 19.82/h
    h.start()
    h.instance("train", H100)
    h.wait_phase("train", "Running")
    st = h.wait(
        lambda: (account(h).get("runway") or {}).get("costPerHour") == "19.82" and account(h),
        "the burn rate of the running instance",
    )
    assert st["runway"]["hoursLeft"] in ("29.9", "30.0") and not hook.of_type("account.runway")

    def tiers() -> list[int]:
        return [m["tier"] for m in hook.of_type("account.runway")]

    h.advance(7 * 3600)  # 23 h left
    h.wait(lambda: tiers() == [24], "the 24 h notice")
    h.advance(20 * 3600 + 1800)  # 2.5 h left
    h.wait(lambda: tiers() == [24, 3], "the 3 h notice")
    h.advance(2 * 3600)  # 0.5 h left
    h.wait(lambda: tiers() == [24, 3, 1], "the 1 h notice")
    st = account(h)
    cond = condition(st, "RunwayNotice")
    assert (cond["status"], cond["reason"]) == ("True", "Below1h")
    assert st["runway"]["noticedHours"] == 1
    # a recharge: 1000 more lasts about 50 h, the episode ends
    h.fund(1000_00, key="top-up")
    h.wait(lambda: condition(account(h), "RunwayNotice")["status"] == "False", "the episode's end")
    assert "noticedHours" not in account(h)["runway"] and tiers() == [24, 3, 1]
    h.advance(28 * 3600)  # below 24 h again: a new episode
    h.wait(lambda: tiers() == [24, 3, 1, 24], "the next episode's 24 h notice")
    assert account_events(h).count("RunwayNotice") == 4
    first = hook.of_type("account.runway")[0]
    assert first["account"] == h.account and first["currency"] == "CNY"
    assert first["hoursLeft"] in ("22.9", "23.0")
    text = metrics(h)
    assert 'gpucloud_runway_notices_total{tier="24"} 2.0' in text
