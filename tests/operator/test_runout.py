"""Enforcement at the predicted run-out instant (gpucloud_operator.runout): the pure
prediction, the clock alarms, and the account reconciler asking for its pass at the
instant the money runs out, against a real SQLite ledger and an injected clock."""

from __future__ import annotations

import copy
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.kube import Kube
from gpucloud_operator.notify import Notifier
from gpucloud_operator.runout import Alarms, run_out_at
from opworld import NS, T0, World

from gpucloud.clock import ManualClock
from gpucloud.ledger import EntryKind

S = timedelta(seconds=1)


def test_prediction_spends_the_available_balance_less_the_slack() -> None:
    # 19.80/h = 0.55 fen/s: (100.00 - 0.02) / 0.55 = 18178.2 s, rounded down
    assert run_out_at(T0, 100_00, 2, Decimal("19.80"), "CNY") == T0 + 18178 * S
    # never sooner than a second from now, even with nothing left but the slack
    assert run_out_at(T0, 1, 3, Decimal("19.80"), "CNY") == T0 + S
    assert run_out_at(T0, -50, 0, Decimal("5.22"), "CNY") == T0 + S
    assert run_out_at(T0, 100_00, 0, Decimal(0), "CNY") is None  # nothing burns
    # a currency without minor units: 7 JPY at 19.80/h = 1272.7 s
    assert run_out_at(T0, 7, 0, Decimal("19.80"), "JPY") == T0 + 1272 * S


def test_alarms_run_at_their_instant_and_a_later_set_moves_them() -> None:
    clock = ManualClock(T0)
    alarms = Alarms(clock)
    ran: list[str] = []
    alarms.set("a", T0 + 10 * S, lambda: ran.append("a"))
    alarms.set("b", T0 + 5 * S, lambda: ran.append("b"))
    alarms.set("b", T0 + 20 * S, lambda: ran.append("b moved"))
    alarms.set("c", T0 + 7 * S, lambda: ran.append("c"))
    alarms.cancel("c")
    clock.set(T0 + 9 * S)
    assert alarms.run_due() == 0 and ran == []  # b was moved, c cancelled
    clock.set(T0 + 10 * S)
    assert alarms.run_due() == 1 and ran == ["a"] and alarms.when("a") is None
    clock.set(T0 + 30 * S)
    assert alarms.run_due() == 1 and ran == ["a", "b moved"]
    assert alarms.run_due() == 0  # each runs once


def test_the_alarm_thread_follows_a_clock_that_jumps() -> None:
    clock = ManualClock(T0)
    alarms = Alarms(clock, max_sleep_s=0.02)
    done = threading.Event()
    alarms.set("a", T0 + timedelta(hours=1), done.set)
    alarms.start()
    assert not done.wait(0.1)  # an hour of clock time away: not yet
    clock.set(T0 + timedelta(hours=1))
    assert done.wait(5), "the alarm did not run once its instant came"


def first_uncovered_second(balance: int, per_hour: str, start: datetime) -> datetime:
    """The oracle: the first whole second at which the run's cost, rounded to fen half
    to even, exceeds ``balance`` (the arrears rule: available < 0)."""
    rate = Fraction(per_hour) * 100 / 3600  # fen per second
    s = int(balance / rate)
    while round(rate * s) <= balance:
        s += 1
    return start + s * S


def reconciler(w: World, alarms: Alarms) -> AccountReconciler:
    return AccountReconciler(
        w.kube, w.ledger, w.clock, w.cfg, alarms=alarms, wake_instance=w.rec.reconcile_named
    )


def funded(w: World, minor: int) -> tuple[Alarms, AccountReconciler, dict]:
    """The account funded with ``minor``, its alarms, reconciler and Account."""
    w.fund(minor)
    alarms = Alarms(w.clock)
    return alarms, reconciler(w, alarms), w.kube.cluster[("accounts", "acme")]


def test_the_shutdown_happens_at_the_run_out_instant_not_the_next_poll(world: World) -> None:
    w = world
    w.fund(10_44)  # L40S 5.20/h: about 2 h
    alarms = Alarms(w.clock)
    rec = reconciler(w, alarms)
    acct = w.kube.cluster[("accounts", "acme")]
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    start = datetime.fromisoformat(w.status("job")["meterSince"].replace("Z", "+00:00"))
    rec.refresh_account(acct)
    due = first_uncovered_second(10_44, "5.20", start)
    assert due == start + timedelta(hours=2, seconds=32)
    first = alarms.when("acme")
    # early by the storage in the burn rate (5.22/h, storage posts hourly) and the
    # rounding slack, never late
    assert first is not None and due - timedelta(minutes=1) < first <= due
    passes = 0
    while acct["status"]["state"] != "Arrears":
        at = alarms.when("acme")
        assert at is not None and at <= due
        w.clock.set(at)
        assert alarms.run_due() == 1
        passes += 1
    # one at the prediction, one at the corrected one, then one a second while the last
    # 2 fen (1 fen of slack + 1 of rounding) run out at 0.144 fen/s: at most 2 + 14
    assert passes <= 16
    assert acct["status"]["arrearsSince"] == due.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert alarms.when("acme") is None  # in arrears: nothing left to predict
    # the instance pass ran at once, reading the fresh Arrears state (the cache dropped)
    assert w.kube.forgotten == ["accounts"]
    st = w.status("job")
    assert st["phase"] == "Stopped" and "ArrearsShutdown" in w.kube.reasons("job")
    assert not w.kube.pods
    (gpu,) = [m for m in w.ledger.meters("acme") if m.kind == "gpu_time"]
    assert gpu.closed_at == due  # billed to the run-out instant: overdraft under a second


def test_a_recharge_in_between_moves_the_pass(world: World) -> None:
    w = world
    alarms, rec, acct = funded(w, 10_44)
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    rec.refresh_account(acct)
    first = alarms.when("acme")
    assert first is not None
    w.clock.advance(timedelta(hours=1))
    w.ledger.post_entry("acme", EntryKind.RECHARGE, 5_20, "top-up", at=w.clock.now())
    rec.refresh_account(acct)  # the Recharge's pass, or the periodic one
    moved = alarms.when("acme")
    assert moved is not None and moved - first > timedelta(minutes=59)  # 5.20 = one more hour
    w.clock.set(first)
    assert alarms.run_due() == 0  # the old instant passes without a pass
    assert acct["status"]["state"] != "Arrears" and w.status("job")["phase"] == "Running"
    # the instance stopped by hand: only its storage burns (50 GiB x 0.0004/h), days away
    w.kube.update_spec("gpuinstances", NS, "job", {"state": "Stopped"})
    w.tick()
    rec.refresh_account(acct)
    later = alarms.when("acme")
    assert later is not None and later - w.clock.now() > timedelta(days=5)


def test_a_forgotten_list_is_loaded_again_even_if_a_load_was_under_way() -> None:
    kube = Kube.__new__(Kube)  # the cache only: no API server needed
    kube._init_cache()
    loads: list[int] = []

    def load() -> list[int]:
        loads.append(len(loads))
        if len(loads) == 2:
            kube.forget("accounts")  # a write lands while this load is on its way
        return list(loads)

    assert kube._cached("list:accounts", 60, load) == [0]
    assert kube._cached("list:accounts", 60, load) == [0]  # cached
    kube.forget("accounts")
    assert kube._cached("list:accounts", 60, load) == [0, 1]  # loaded again
    assert kube._cached("list:accounts", 60, load) == [0, 1, 2]  # that load predates a forget
    assert kube._cached("list:accounts", 60, load) == [0, 1, 2]


class Sent(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.types: list[str] = []

    def notify(self, url: str | None, payload: dict) -> bool:
        self.types.append(payload["type"])
        return True


def test_a_kopf_body_older_than_the_alarms_pass_announces_nothing_twice(world: World) -> None:
    w = world
    w.fund(10_44)
    alarms, sent = Alarms(w.clock), Sent()
    rec = AccountReconciler(
        w.kube, w.ledger, w.clock, w.cfg, sent, alarms=alarms, wake_instance=w.rec.reconcile_named
    )
    acct = w.kube.cluster[("accounts", "acme")]
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    rec.refresh_account(acct)
    while acct["status"]["state"] != "Arrears":
        kopf_body = copy.deepcopy(acct)  # what Kopf last saw, before the alarm's patch
        at = alarms.when("acme")
        assert at is not None
        w.clock.set(at)
        alarms.run_due()
    assert sent.types.count("Arrears") == 1
    rec.refresh_account(kopf_body)  # the periodic pass, with a body from before arrears
    assert sent.types.count("Arrears") == 1 and acct["status"]["state"] == "Arrears"


# -- StopPayAsYouGo budgets: the stop at the instant the budget is spent ----------------

A100 = "NVIDIA-A100-SXM4-80GB"  # 9.80/h; a budget of 3.33 is 1223.3 s of it


def first_spent_second(monthly: int, start: datetime, *per_hour: str) -> datetime:
    """The oracle: the first whole second at which the cost of runs started at ``start``,
    each rounded to fen half to even, reaches ``monthly`` (StopPayAsYouGo: spent >=
    monthly)."""
    rates = [Fraction(p) * 100 / 3600 for p in per_hour]  # fen per second
    s = 0
    while sum(round(rate * s) for rate in rates) < monthly:
        s += 1
    return start + s * S


def stop_budget(w: World, monthly: str, namespace: str | None = None) -> None:
    budget = {"monthly": monthly} if namespace is None else {
        "namespaces": [{"namespace": namespace, "monthly": monthly}]
    }  # fmt: skip
    w.kube.cluster[("accounts", "acme")]["spec"]["budget"] = {
        **budget, "enforcement": "StopPayAsYouGo"
    }  # fmt: skip


def started(w: World, name: str, ns: str = NS) -> datetime:
    since = w.kube.instance(ns, name)["status"]["meterSince"]
    return datetime.fromisoformat(since.replace("Z", "+00:00"))


def run_alarms_until_stopped(w: World, alarms: Alarms, name: str, due: datetime) -> int:
    """Only the alarms run (no instance tick, no periodic account pass): how many passes
    it took until ``name`` stopped; none is ever due after ``due``."""
    passes = 0
    while w.status(name)["phase"] != "Stopped":
        at = alarms.when("acme")
        assert at is not None and at <= due
        w.clock.set(at)
        assert alarms.run_due() == 1
        passes += 1
    return passes


@pytest.mark.parametrize("scope", ["account", "namespace"])
def test_a_budget_stop_lands_at_the_instant_it_is_spent_not_the_next_poll(
    world: World, scope: str
) -> None:
    w = world
    # the money lasts days: the budget is what stops the run
    alarms, rec, acct = funded(w, 1000_00)
    acct["spec"]["namespaces"] = [NS, "team-b"]
    w.instance("job", A100)
    # another namespace's run: outside a namespace budget, it must not bring the
    # prediction forward nor be stopped (under the account's budget, it is both)
    w.kube.add_namespaced("gpuinstances", {
        "metadata": {"name": "other", "namespace": "team-b"},
        "spec": {"gpu": {"product": "NVIDIA-L40S", "count": 1},
                 "billing": {"mode": "PayAsYouGo"}, "state": "Running"},
    })  # fmt: skip
    w.tick()
    assert w.status("job")["phase"] == "Running"
    start = started(w, "job")
    # set once running (a start is refused when its first hour would not fit)
    stop_budget(w, "3.33", None if scope == "account" else NS)
    rec.refresh_account(acct)
    first = alarms.when("acme")
    if scope == "namespace":
        due = first_spent_second(333, start, "9.80")
        assert due == start + timedelta(seconds=1222)
    else:  # both runs count: 9.80 + 5.20 = 15.00/h
        assert started(w, "other", "team-b") == start
        due = first_spent_second(333, start, "9.80", "5.20")
        assert due == start + timedelta(seconds=799)
    # early by the storage in the burn rate and the rounding slack, never late
    assert first is not None and due - timedelta(minutes=1) < first <= due
    passes = run_alarms_until_stopped(w, alarms, "job", due)
    # the prediction, then a second at a time while the slack runs out (a fen per meter:
    # 2 fen at 0.42 fen/s for two runs, plus one of rounding): each a second, never late
    assert passes <= 8
    st = w.status("job")
    assert st["stoppedAt"] == due.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "BudgetExceeded" in w.kube.reasons("job") and "StopPayAsYouGo" in st["message"]
    assert w.kube.forgotten == ["accounts"]  # the instance pass read the Exceeded state
    [gpu] = [
        m for m in w.ledger.meters("acme") if (m.kind, m.resource) == ("gpu_time", f"{NS}/job")
    ]
    assert gpu.closed_at == due  # billed to the second the budget was spent
    other = w.kube.instance("team-b", "other")["status"]["phase"]
    assert other == ("Running" if scope == "namespace" else "Stopped")


def test_a_budget_raised_before_the_instant_moves_the_stop(world: World) -> None:
    w = world
    alarms, rec, acct = funded(w, 1000_00)
    w.instance("job", A100)
    w.tick()
    start = started(w, "job")
    stop_budget(w, "3.33")
    rec.refresh_account(acct)
    first = alarms.when("acme")
    assert first is not None and first <= first_spent_second(333, start, "9.80")
    w.clock.set(start + timedelta(minutes=10))
    stop_budget(w, "6.66")  # raised before the instant
    rec.refresh_account(acct)  # the Account's update handler
    due = first_spent_second(666, start, "9.80")
    assert due == start + timedelta(seconds=2445)
    moved = alarms.when("acme")
    assert moved is not None and due - timedelta(minutes=1) < moved <= due
    w.clock.set(first)
    assert alarms.run_due() == 0  # the old instant passes without a pass
    assert w.status("job")["phase"] == "Running" and "BudgetExceeded" not in w.kube.reasons("job")
    run_alarms_until_stopped(w, alarms, "job", due)
    assert w.status("job")["stoppedAt"] == due.strftime("%Y-%m-%dT%H:%M:%SZ")

    # enforcement that stops nothing predicts nothing: only the money's run-out is left,
    # days away (1000.00 at the storage's 0.02/h, the run stopped)
    acct["spec"]["budget"]["enforcement"] = "RefuseStarts"
    rec.refresh_account(acct)
    later = alarms.when("acme")
    assert later is None or later - w.clock.now() > timedelta(days=30)
