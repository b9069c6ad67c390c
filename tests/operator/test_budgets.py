"""Budgets and runway notices through the reconcilers: the fake cluster, a real SQLite
ledger and an injected clock. The A100 costs 9.80/h and its 50 GiB quota 0.02/h, a
budget of 33.33 does not divide into either: tiers are reached on fractions of a fen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.metrics import OperatorMetrics
from gpucloud_operator.notify import Notifier
from opworld import NS, World

from gpucloud.billing import to_minor
from gpucloud.ledger import EntryKind

A100, L40S = "NVIDIA-A100-SXM4-80GB", "NVIDIA-L40S"
HALF_HOUR = timedelta(minutes=30)


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []

    def notify(self, url: str | None, payload: dict[str, Any]) -> bool:
        self.sent.append(payload)
        return True


class Bed:
    """The world plus the account reconciler, a webhook recorder and fresh metrics."""

    def __init__(self, w: World, **spec: Any) -> None:
        self.w = w
        self.metrics = OperatorMetrics()
        self.hook = Recorder()
        self.acct = w.kube.cluster[("accounts", "acme")]
        self.acct["spec"].update(spec)
        self.rec = AccountReconciler(
            w.kube, w.ledger, w.clock, w.cfg, self.hook,
            metrics=self.metrics.accounts, counters=self.metrics.notices,
        )  # fmt: skip
        w.rec.counters = self.metrics.notices

    def step(self, by: timedelta = timedelta(0)) -> dict[str, Any]:
        """Time passes; the instances' passes (hourly storage), then the account's."""
        self.w.clock.advance(by)
        self.w.tick()
        self.rec.refresh_account(self.acct)
        return self.acct["status"]

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.hook.sent if m["type"] == kind]

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.acct["status"]["conditions"] if c["type"] == type_)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def test_tiers_once_each_then_starts_refused_with_the_figures(world: World) -> None:
    w = world
    bed = Bed(w, budget={"monthly": "33.33"})
    w.fund(1000_00)
    w.instance("job", A100)
    st = bed.step()
    assert w.status("job")["phase"] == "Running"
    assert st["budget"] == {
        "month": "2026-01", "spent": "0.00", "monthly": "33.33", "percent": 0, "state": "Ok",
    }  # fmt: skip
    seen = []
    for half_hours in range(1, 9):
        st = bed.step(HALF_HOUR)
        charged = -sum(
            e.amount_minor for e in w.ledger.entries("acme", limit=10_000) if e.amount_minor < 0
        )
        spent = charged + to_minor(Fraction("9.80") * half_hours / 2)  # the open meter
        assert st["budget"]["spent"] == f"{spent / 100:.2f}"
        assert st["budget"]["percent"] == spent * 100 // 33_33
        seen.append((st["budget"]["percent"], st["budget"]["state"]))
        bed.step()  # a pass with no time passing sends nothing again
    # 2 h: 19.64 = 58%; 3 h: 29.46 = 88%; 3.5 h: 34.36 = 103%
    assert seen == [
        (14, "Ok"), (29, "Ok"), (44, "Ok"), (58, "Warning"), (73, "Warning"), (88, "Warning"),
        (103, "Exceeded"), (117, "Exceeded"),
    ]  # fmt: skip
    assert [m["percent"] for m in bed.sent("budget.threshold")] == [50, 80]
    (exceeded,) = bed.sent("budget.exceeded")
    assert exceeded["spent"] == "34.36" and exceeded["monthly"] == "33.33"
    assert exceeded["enforcement"] == "RefuseStarts" and exceeded["namespace"] is None
    assert exceeded["month"] == "2026-01" and exceeded["currency"] == "CNY"
    reasons = w.kube.reasons("acme")
    assert reasons.count("BudgetWarning") == 2 and reasons.count("BudgetExceeded") == 1
    assert bed.condition("BudgetExceeded")["status"] == "True"
    assert bed.condition("BudgetWarning")["reason"] == "Reached80Percent"
    assert st["budget"]["notifiedPercent"] == 100
    assert bed.sample("gpucloud_account_budget_spent_ratio", account="acme", namespace="") > 1
    assert bed.sample("gpucloud_budget_notices_total", percent="80") == 1
    # the running instance keeps running (RefuseStarts); a new start is refused
    w.instance("more", "NVIDIA-L40S")
    w.tick("more")
    more = w.status("more")
    assert more["phase"] == "Refused" and not any(
        p["metadata"]["name"].startswith("more") for p in w.kube.pods.values()
    )
    (ready,) = [c for c in more["conditions"] if c["type"] == "Ready"]
    assert ready["reason"] == "BudgetExceeded"
    assert ready["message"].startswith(
        "the budget of account 'acme' would be exceeded: spent 39.28 CNY of 33.33 CNY in "
        "2026-01, and one hour of team-a/more adds 5.22 CNY"
    )
    assert "BudgetExceeded" in w.kube.reasons("more")
    assert w.status("job")["phase"] == "Running"
    assert bed.sample("gpucloud_budget_refusals_total", account="acme") == 1
    # a larger budget lets it start
    bed.acct["spec"]["budget"] = {"monthly": "100.00"}
    st = bed.step()
    assert st["budget"]["state"] == "Ok" and st["budget"]["notifiedPercent"] == 100
    assert bed.condition("BudgetExceeded")["status"] == "False"
    assert w.status("more")["phase"] == "Running"


def test_a_jump_over_two_tiers_sends_one_notice_for_the_highest(world: World) -> None:
    w = world
    bed = Bed(w, budget={"monthly": "20.00", "notifyAtPercent": [50, 80]})
    w.fund(1000_00)
    w.instance("job", A100)
    bed.step()
    st = bed.step(timedelta(hours=2))  # 19.64 of 20.00: past 50 and 80 in one pass
    assert (st["budget"]["percent"], st["budget"]["notifiedPercent"]) == (98, 80)
    assert [m["percent"] for m in bed.hook.sent if m["type"].startswith("budget.")] == [80]
    bed.step(timedelta(minutes=3))  # 20.13: exceeded, although 100 is not listed
    assert [m["type"] for m in bed.hook.sent if m["type"].startswith("budget.")] == [
        "budget.threshold", "budget.exceeded",
    ]  # fmt: skip


def test_a_new_month_starts_over(world: World) -> None:
    w = world
    bed = Bed(w, budget={"monthly": "10.00"})
    w.fund(1000_00)
    w.instance("job", A100)
    bed.step()
    assert bed.step(timedelta(hours=2))["budget"]["state"] == "Exceeded"
    w.kube.update_spec("gpuinstances", NS, "job", {"state": "Stopped"})
    bed.step(timedelta(minutes=1))
    bed.step(timedelta(minutes=2))  # past the metering grace: settled in January
    assert not any(
        m.closed_at is None or m.settled_at is None
        for m in w.ledger.meters("acme")
        if m.kind == "gpu_time"
    )
    w.clock.set(datetime(2026, 1, 31, 23, 59, tzinfo=UTC))
    bed.step()  # January's storage, posted in January
    w.clock.set(datetime(2026, 2, 1, 0, 0, 30, tzinfo=UTC))
    st = bed.step()  # the hour 23:00 -> 00:00 is posted now: February's first 0.02
    assert st["budget"] == {
        "month": "2026-02", "spent": "0.02", "monthly": "10.00", "percent": 0, "state": "Ok",
    }  # fmt: skip
    assert bed.condition("BudgetExceeded")["status"] == "False"
    assert bed.condition("BudgetWarning")["status"] == "False"
    w.instance("next", A100)
    w.tick("next")
    assert w.status("next")["phase"] == "Running"
    bed.step(timedelta(minutes=30))  # 4.90 + 0.02: 49%
    bed.step(timedelta(minutes=1))  # 5.06 + 0.02: the 50% notice of February
    assert [m["month"] for m in bed.sent("budget.threshold")] == ["2026-02"]
    assert [m["month"] for m in bed.sent("budget.exceeded")] == ["2026-01"]


def test_stop_pay_as_you_go_stops_metered_runs_by_the_second_and_spares_packages(
    world: World,
) -> None:
    w = world
    bed = Bed(w)
    w.fund(1000_00)
    w.instance("pkg", L40S, mode="Package", period="Day")
    bed.step()
    assert w.status("pkg")["phase"] == "Running"  # 112.00 paid upfront
    bed.acct["spec"]["budget"] = {"monthly": "150.00", "enforcement": "StopPayAsYouGo"}
    w.instance("payg", A100)
    st = bed.step()
    assert w.status("payg")["phase"] == "Running"
    started = w.status("payg")["meterSince"]
    assert st["budget"]["spent"] == "112.00"
    # 38.00 / 9.80 = 3 h 52 min 39.2 s to the budget (plus 0.06 storage): past it at 3 h 53 min
    st = bed.step(timedelta(hours=3, minutes=53))
    assert st["budget"]["state"] == "Exceeded"
    stop_at = w.clock.now()
    w.tick()
    payg = w.status("payg")
    assert payg["phase"] == "Stopped" and payg["stoppedAt"] == stop_at.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert "StopPayAsYouGo" in payg["message"] and "BudgetExceeded" in w.kube.reasons("payg")
    assert w.status("pkg")["phase"] == "Running"  # a paid term runs on
    # settled by the second, like any stop, once the metering grace is over
    bed.step(timedelta(seconds=61))
    (fallback,) = [
        e for e in w.ledger.entries("acme", limit=10_000) if e.key.startswith("meter-fallback:")
    ]
    seconds = int(
        (stop_at - datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
    )
    assert -fallback.amount_minor == to_minor(Fraction("9.80") * seconds / 3600)
    # it stays down, and starting it again is refused while the month is spent
    bed.step(timedelta(minutes=5))
    assert w.status("payg")["phase"] == "Stopped"
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick("payg")
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Running"})
    w.tick("payg")
    assert w.status("payg")["phase"] == "Refused"


def test_a_namespace_budget_covers_only_its_namespace(world: World) -> None:
    w = world
    bed = Bed(
        w,
        namespaces=[NS, "team-b"],
        instanceLimit=5,
        budget={"namespaces": [{"namespace": "team-b", "monthly": "12.00"}]},
    )
    w.fund(1000_00)

    def instance(ns: str, name: str) -> None:
        w.kube.add_namespaced(
            "gpuinstances",
            {
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "gpu": {"product": A100, "count": 1},
                    "billing": {"mode": "PayAsYouGo"},
                    "state": "Running",
                },
            },
        )

    instance("team-b", "b1")
    instance(NS, "a1")
    bed.step()
    st = bed.step(timedelta(minutes=75))  # each 12.25 + 0.02: team-b over, the account twice
    assert st["budget"]["spent"] == "24.54"
    assert "monthly" not in st["budget"] and "percent" not in st["budget"]
    assert st["budget"]["namespaces"] == [
        {
            "namespace": "team-b", "monthly": "12.00", "spent": "12.27", "percent": 102,
            "state": "Exceeded", "notifiedPercent": 100,
        }
    ]  # fmt: skip
    (notice,) = bed.sent("budget.exceeded")
    assert notice["namespace"] == "team-b"
    instance("team-b", "b2")
    instance(NS, "a2")
    w.tick("b2", "a2")
    assert w.status("a2")["phase"] == "Running"
    b2 = w.kube.instance("team-b", "b2")["status"]
    assert b2["phase"] == "Refused" and "namespace 'team-b' of account 'acme'" in b2["message"]


def test_a_budget_finer_than_the_currency_is_reported_not_applied(world: World) -> None:
    w = world
    w.kube.add_cluster(
        "accounts",
        {
            "metadata": {"name": "yen"},
            "spec": {"namespaces": ["team-y"], "currency": "JPY", "budget": {"monthly": "100.5"}},
        },
    )
    acct = w.kube.cluster[("accounts", "yen")]
    rec = AccountReconciler(w.kube, w.ledger, w.clock, w.cfg, Recorder())
    rec.refresh_account(acct)
    (valid,) = [c for c in acct["status"]["conditions"] if c["type"] == "Valid"]
    assert (valid["status"], valid["reason"]) == ("False", "InvalidBudget")
    assert "spec.budget.monthly" in valid["message"] and "budget" not in acct["status"]
    acct["spec"]["budget"] = {"monthly": "100"}
    rec.refresh_account(acct)
    (valid,) = [c for c in acct["status"]["conditions"] if c["type"] == "Valid"]
    assert valid["status"] == "True" and acct["status"]["budget"]["monthly"] == "100"


# -- runway ---------------------------------------------------------------------------------
def test_runway_episode_24_3_1_then_a_recharge_starts_over(world: World) -> None:
    w = world
    bed = Bed(w)
    w.fund(294_60)  # 30 h of an A100 with its storage (9.82/h)
    w.instance("job", A100)
    st = bed.step()
    assert st["runway"] == {"hoursLeft": "30.0", "costPerHour": "9.82"}
    assert not bed.sent("account.runway")
    st = bed.step(timedelta(hours=7))  # 23 h left
    assert st["runway"]["noticedHours"] == 24
    bed.step(timedelta(hours=10))
    st = bed.step(timedelta(hours=10, minutes=30))  # 2.5 h left
    assert st["runway"]["noticedHours"] == 3
    bed.step(timedelta(hours=2))  # 0.5 h left
    tiers = [(m["tier"], m["hoursLeft"]) for m in bed.sent("account.runway")]
    assert tiers == [(24, "23.0"), (3, "2.5"), (1, "0.5")]
    cond = bed.condition("RunwayNotice")
    assert (cond["status"], cond["reason"]) == ("True", "Below1h")
    assert "below the 1 h notice tier" in cond["message"]
    assert w.kube.reasons("acme").count("RunwayNotice") == 3
    assert bed.sample("gpucloud_runway_notices_total", tier="3") == 1
    # a recharge takes the runway back above 24 h: the episode ends
    w.ledger.post_entry("acme", EntryKind.RECHARGE, 500_00, "fund-2", at=w.clock.now())
    st = bed.step()
    assert "noticedHours" not in st["runway"]
    assert bed.condition("RunwayNotice")["status"] == "False"
    bed.step(timedelta(hours=28))  # below 24 h again: a new episode, a new notice
    assert [m["tier"] for m in bed.sent("account.runway")] == [24, 3, 1, 24]


def test_the_deprecated_low_balance_hours_is_one_tier(world: World) -> None:
    w = world
    bed = Bed(w, lowBalanceWarningHours=12)
    w.fund(98_20)  # 10 h
    w.instance("job", A100)
    st = bed.step()
    assert st["state"] == "LowBalance"
    bed.step(timedelta(hours=9, minutes=40))  # 20 min left: no tier below 12
    assert [m["tier"] for m in bed.sent("account.runway")] == [12]
    assert len(bed.sent("LowBalanceWarning")) == 1
