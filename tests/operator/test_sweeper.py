"""The sweeper (gpucloud_operator.instances.sweeper): the schedule of instance passes
keyed by the injected clock, the rule that says when an instance next needs a pass, and
the reconciler's passes setting it. No due pass is ever skipped; a clock jump makes
everything due at once; nothing waits longer than ``sweep_max_interval_s``."""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances.sweeper import Due, Seen, Sweeper, Work, next_due
from gpucloud_operator.rules import fmt
from hypothesis import given, settings
from hypothesis import strategies as st
from opworld import NS, World

from gpucloud.clock import ManualClock

T0 = datetime(2026, 1, 10, 12, 0, 17, tzinfo=UTC)
CFG = OperatorConfig(tick_interval_s=10, sweep_max_interval_s=300)
L40S = "NVIDIA-L40S"


class Mono:
    """A monotonic clock that moves when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sweeper(clock: ManualClock, mono: Mono, ran: list[str]) -> Sweeper:
    return Sweeper(clock, lambda ns, name, uid: ran.append(uid), retry_s=10, monotonic=mono)


# -- the schedule ---------------------------------------------------------------------
def test_an_entry_runs_at_its_clock_instant_and_not_before() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(seconds=30), real_s=600))
    clock.advance(29)
    assert s.run_due() == 0
    clock.advance(1)
    assert s.run_due() == 1 and ran == ["u1"]
    assert s.run_due() == 0 and len(s) == 0  # taken: the pass sets the next entry


def test_a_clock_jump_makes_everything_due_at_once() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    for i in range(50):
        s.due(f"u{i}", NS, f"i{i}", Due(at=T0 + timedelta(hours=i + 1), real_s=10_000))
    clock.advance(timedelta(days=3))
    assert s.run_due() == 50
    assert sorted(ran) == sorted(f"u{i}" for i in range(50))


def test_a_clock_that_stands_still_still_runs_the_real_time_deadline() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(hours=1), real_s=60))
    mono.t += 59.9
    assert s.run_due() == 0
    mono.t += 0.1
    assert s.run_due() == 1


def test_earlier_moves_an_entry_forward_never_back() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(seconds=100), real_s=600))
    s.earlier("u1", NS, "a", T0 + timedelta(seconds=200))  # later: ignored
    assert s.when("u1")[0] == T0 + timedelta(seconds=100)
    s.earlier("u1", NS, "a", T0 + timedelta(seconds=20))
    clock.advance(20)
    assert s.run_due() == 1
    s.earlier("u2", NS, "b", T0)  # none yet: one is made
    assert s.run_due() == 1 and ran == ["u1", "u2"]


def test_a_later_pass_replaces_the_entry_and_forget_drops_it() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(seconds=10), real_s=600))
    s.due("u1", NS, "a", Due(at=T0 + timedelta(seconds=60), real_s=600))
    clock.advance(30)
    assert s.run_due() == 0  # the old instant is stale
    s.forget("u1")
    clock.advance(60)
    assert s.run_due() == 0 and ran == []


def test_a_failed_pass_is_retried_at_the_busy_pace() -> None:
    clock, mono = ManualClock(T0), Mono()

    def fail(ns: str, name: str, uid: str) -> None:
        raise RuntimeError("API down")

    s = Sweeper(clock, fail, retry_s=10, monotonic=mono)
    s.due("u1", NS, "a", Due(at=T0, real_s=0))
    assert s.run_due() == 1
    assert s.when("u1") == (T0 + timedelta(seconds=10), mono.t + 10)


def test_stale_heap_items_are_compacted() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    for i in range(1000):
        s.due("u1", NS, "a", Due(at=T0 + timedelta(seconds=i + 1), real_s=600))
    s.take_due()
    assert len(s._by_clock) <= 64 + 4  # one live entry, not a thousand stale ones


ops = st.lists(
    st.tuples(
        st.sampled_from(["due", "earlier", "advance", "mono"]),
        st.integers(0, 4),  # which instance
        st.integers(0, 400),  # seconds
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_no_due_pass_is_ever_skipped(steps: list[tuple[str, int, int]]) -> None:
    """Against a model: after any sequence of schedule changes and clock moves, each
    round takes exactly the instances whose latest wish is due, by clock or real time,
    as whole passes, and as refreshes those whose only due thing is their refresh (once
    each until ``refreshed``); every wish is taken once time has passed it."""
    clock, mono, ran = ManualClock(T0), Mono(), []
    refreshed: list[str] = []
    s = Sweeper(clock, lambda ns, name, uid: ran.append(uid), retry_s=10, monotonic=mono,
                refresh=lambda items: refreshed.extend(u for _, _, u in items))  # fmt: skip
    # uid -> (clock instant, pass deadline, refresh deadline or None)
    model: dict[str, tuple[datetime, float, float | None]] = {}
    for op, i, sec in steps:
        uid = f"u{i}"
        if op == "due":
            refresh = sec // 2 + 1 if i % 2 else None
            s.due(uid, NS, uid, Due(at=clock.now() + timedelta(seconds=sec), real_s=sec + 5,
                                    refresh_s=refresh))  # fmt: skip
            model[uid] = (
                clock.now() + timedelta(seconds=sec),
                mono.t + sec + 5,
                None if refresh is None else mono.t + refresh,
            )
        elif op == "earlier":
            at = clock.now() + timedelta(seconds=sec)
            s.earlier(uid, NS, uid, at)
            old = model.get(uid)
            if old is None:
                model[uid] = (at, mono.t + 10, None)
            elif at < old[0]:
                model[uid] = (at, old[1], old[2])
        elif op == "advance":
            clock.advance(sec)
        else:
            mono.t += sec
        due = {u for u, (at, dl, _) in model.items() if at <= clock.now() or dl <= mono.t}
        fresh = {u for u, (_, _, rf) in model.items() if u not in due and rf and rf <= mono.t}
        ran.clear()
        refreshed.clear()
        s.run_due()
        assert sorted(ran) == sorted(due)
        assert sorted(refreshed) == sorted(fresh)
        for u in due:
            del model[u]
        for u in fresh:
            model[u] = (model[u][0], model[u][1], None)  # in flight: not again
    clock.advance(timedelta(days=1))
    ran.clear()
    s.run_due()
    assert sorted(ran) == sorted(model)  # nothing left behind


# -- when an instance next needs a pass ----------------------------------------------
def running(**status: object) -> dict:
    return {"phase": "Running", "billingMode": "PayAsYouGo", "meterId": "m1", **status}


def test_a_quiet_running_instance_waits_for_the_storage_hour_or_the_cost_refresh() -> None:
    cfg = OperatorConfig(sweep_max_interval_s=7200)
    due = next_due(Seen(status=running(), now=T0, cost_left_s=42.5), cfg, 60)
    assert due.at == datetime(2026, 1, 10, 13, tzinfo=UTC)  # the storage window's end
    assert due.real_s == 42.5


def test_a_refresh_due_now_waits_a_second_not_none() -> None:
    """cost_refresh_s 0 (tests) or a refresh overdue: a pass a second, never a spin."""
    due = next_due(Seen(status=running(), now=T0, cost_left_s=-5.0), CFG, 60)
    assert due.real_s == 1.0


def test_the_cap_holds_when_no_rule_is_due_sooner() -> None:
    cfg = OperatorConfig(tick_interval_s=10, sweep_max_interval_s=120, storage_settlement_s=0)
    due = next_due(Seen(status={"phase": "Stopped"}, now=T0), cfg, 60)
    assert due == Due(at=T0 + timedelta(seconds=120), real_s=120)


@pytest.mark.parametrize(
    "status",
    [
        {"phase": "Pending"},
        {"phase": "Queued"},
        {"phase": "Refused"},
        running(unsettledMeters=["m0"]),
        running(conditions=[{"type": "DataDeleted", "reason": "WipePending"}]),
    ],
)
def test_a_busy_instance_is_checked_every_tick(status: dict) -> None:
    due = next_due(Seen(status=status, now=T0), CFG, 60)
    assert due == Due(at=T0 + timedelta(seconds=10), real_s=10)


def test_a_pass_that_failed_is_retried_at_the_busy_pace() -> None:
    due = next_due(Seen(status=running(), now=T0, failed=True), CFG, 60)
    assert due == Due(at=T0 + timedelta(seconds=10), real_s=10)


def test_a_spot_notice_is_due_at_its_stop() -> None:
    stop = T0 + timedelta(seconds=95)
    st_ = running(preemptAt=fmt(T0 + timedelta(seconds=120)), preemptStopAt=fmt(stop))
    assert next_due(Seen(status=st_, now=T0), CFG, 60).at == stop
    st_.pop("preemptStopAt")  # not delivered yet: the deadline itself
    assert next_due(Seen(status=st_, now=T0), CFG, 60).at == T0 + timedelta(seconds=120)


def test_an_account_in_arrears_makes_its_instances_busy() -> None:
    due = next_due(Seen(status=running(), now=T0, in_arrears=True), CFG, 60)
    assert due.at == T0 + timedelta(seconds=10)


def test_a_package_term_is_due_at_its_reminder_then_its_end() -> None:
    end = T0 + timedelta(days=30)
    term = {"start": fmt(T0), "end": fmt(end)}
    cfg = OperatorConfig(sweep_max_interval_s=10**7, storage_settlement_s=0)
    st_ = running(billingMode="PackageMonth", packageTerms=[term])
    month_end = datetime(2026, 2, 1, tzinfo=UTC)
    assert next_due(Seen(status=st_, now=T0), cfg, 60).at == min(month_end, end - timedelta(7))
    later = end - timedelta(days=5)  # the reminder was sent
    st_["reminderSentFor"] = fmt(end)
    assert next_due(Seen(status=st_, now=later), cfg, 60).at == min(
        end, datetime(2026, 3, 1, tzinfo=UTC)
    )


def test_an_idle_policy_is_checked_a_clock_minute_after_the_last_check() -> None:
    seen = Seen(status=running(), now=T0, idle_checked=T0 - timedelta(seconds=15))
    assert next_due(seen, CFG, 60).at == T0 + timedelta(seconds=45)


def test_the_gpus_first_lookups_keep_the_busy_pace() -> None:
    due = next_due(Seen(status=running(), now=T0, cost_left_s=60, eager_left_s=30), CFG, 60)
    assert due.real_s == 10


# -- what kind of work is due (rule 3a) ----------------------------------------------
def test_a_refreshable_run_s_cost_refresh_is_a_refresh_not_a_pass() -> None:
    cfg = OperatorConfig(sweep_max_interval_s=300, tick_interval_s=10)
    seen = Seen(status=running(), now=T0, cost_left_s=60, refreshable=True)
    due = next_due(seen, cfg, 60)
    assert (due.real_s, due.refresh_s) == (300, 60)  # the cap stays the pass's
    assert due.work(T0, 59.9) is None
    assert due.work(T0, 60) is Work.REFRESH
    assert due.work(T0, 300) is Work.PASS  # the cap: a whole pass
    assert due.work(due.at, 60) is Work.PASS  # a clock rule wins over a refresh


def test_the_gpus_first_lookups_are_refreshes_at_the_busy_pace() -> None:
    seen = Seen(status=running(), now=T0, cost_left_s=60, eager_left_s=30, refreshable=True)
    due = next_due(seen, CFG, 60)
    assert due.refresh_s == 10 and due.real_s == 300


def test_without_a_ticket_the_refresh_is_a_whole_pass() -> None:
    due = next_due(Seen(status=running(), now=T0, cost_left_s=42.5), CFG, 60)
    assert (due.real_s, due.refresh_s) == (42.5, None)
    assert due.work(T0, 42.5) is Work.PASS


def test_a_busy_instance_gets_no_refresh_of_its_own() -> None:
    """Its passes come every tick anyway, each refreshing what is due."""
    seen = Seen(status=running(), now=T0, in_arrears=True, cost_left_s=60, refreshable=True)
    due = next_due(seen, CFG, 60)
    assert (due.real_s, due.refresh_s) == (10, None)


def test_a_due_refresh_keeps_the_entry_s_pass_deadlines() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    batches: list[list[str]] = []
    s = Sweeper(clock, lambda ns, name, uid: ran.append(uid), retry_s=10, monotonic=mono,
                refresh=lambda items: batches.append([u for _, _, u in items]))  # fmt: skip
    for i in range(3):
        s.due(f"u{i}", NS, f"i{i}", Due(at=T0 + timedelta(seconds=100), real_s=300, refresh_s=60))
    mono.t += 60
    assert s.run_due() == 3 and ran == [] and batches == [["u0", "u1", "u2"]]
    assert s.when("u0") == (T0 + timedelta(seconds=100), 1300.0)  # pass deadlines kept
    assert s.refresh_at("u0") is None  # in flight until ``refreshed``
    assert s.run_due() == 0
    s.refreshed("u0", 60)
    assert s.refresh_at("u0") == mono.t + 60
    clock.advance(100)  # the clock rule: whole passes, not refreshes
    assert s.run_due() == 3 and sorted(ran) == ["u0", "u1", "u2"] and len(batches) == 1
    assert len(s) == 0
    s.refreshed("u0", 60)  # a refresh that ends after a pass took the entry: no entry
    assert len(s) == 0


def test_a_failed_refresh_batch_is_asked_again_at_the_busy_pace() -> None:
    clock, mono = ManualClock(T0), Mono()

    def fail(items: list) -> None:
        raise RuntimeError("ledger down")

    s = Sweeper(clock, lambda *a: None, retry_s=10, monotonic=mono, refresh=fail)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(hours=1), real_s=300, refresh_s=5))
    mono.t += 5
    assert s.run_due() == 1
    assert s.refresh_at("u1") == mono.t + 10


def test_without_a_refresher_a_due_refresh_runs_as_a_pass() -> None:
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = sweeper(clock, mono, ran)
    s.due("u1", NS, "a", Due(at=T0 + timedelta(hours=1), real_s=300, refresh_s=5))
    mono.t += 5
    assert s.run_due() == 1 and ran == ["u1"] and len(s) == 0


statuses = st.fixed_dictionaries(
    {
        "phase": st.sampled_from(["Running", "Stopped", "Pending", "Expired", "Refused"]),
        "billingMode": st.sampled_from(["PayAsYouGo", "PackageDay"]),
    }
)


@settings(max_examples=200, deadline=None)
@given(
    statuses,
    st.integers(0, 40 * 24 * 3600),  # now, seconds after T0
    st.integers(1, 10 * 24 * 3600),  # term end after now
    st.integers(1, 3 * 3600),  # the cap
)
def test_the_next_pass_is_never_after_a_rule_instant(
    status: dict, now_s: int, end_s: int, cap: int
) -> None:
    """Whatever the status: the next pass is after now, within the cap, and not after
    the storage hour's end, the term's end or its reminder, or the month's end."""
    now = T0 + timedelta(seconds=now_s)
    end = now + timedelta(seconds=end_s)
    status = {**status, "packageTerms": [{"start": fmt(T0), "end": fmt(end)}]}
    cfg = OperatorConfig(tick_interval_s=10, sweep_max_interval_s=cap, reminder_lead_s=3600)
    due = next_due(Seen(status=status, now=now), cfg, 60)
    assert now < due.at <= now + timedelta(seconds=max(cap, 1))
    ts = int(now.timestamp())
    assert due.at <= datetime.fromtimestamp(ts - ts % 3600 + 3600, UTC)
    if status["billingMode"].startswith("Package"):
        assert due.at <= max(end, now + timedelta(seconds=1))
        if end - timedelta(hours=1) > now:
            assert due.at <= end - timedelta(hours=1)
    assert due.real_s <= cap


# -- the reconciler's passes set the schedule ----------------------------------------
def test_every_pass_sets_the_next_and_a_jump_past_the_storage_hour_bills_it(
    world: World,
) -> None:
    w = world
    s = Sweeper(
        w.clock,
        lambda ns, name, uid: w.rec.sweep_pass(ns, name, uid, w.kube.instance(ns, name)),
        retry_s=10,
    )
    w.rec.sweeper = s
    w.price("storage", "instancePerGBHour", "0.0005")
    w.fund(1000_00)
    w.instance("nb", L40S, quota=50)
    w.tick()
    uid = w.kube.instance(NS, "nb")["metadata"]["uid"]
    assert w.status("nb")["phase"] == "Running"
    at, _ = s.when(uid)
    assert at == w.clock.now() + timedelta(seconds=300)  # the cap, before the hour's end
    assert s.run_due() == 0 and w.storage_charges() == 0
    w.clock.advance(timedelta(hours=1))
    assert s.run_due() == 1  # the jump: due at once, without a tick
    assert w.storage_charges() == 2  # 50 GiB x 0.0005 for an hour: 0.025, half to even
    assert s.when(uid) is not None  # and the pass set its next entry


def test_a_deleted_instance_leaves_the_schedule(world: World) -> None:
    w = world
    s = Sweeper(w.clock, lambda ns, name, uid: w.rec.sweep_pass(ns, name, uid), retry_s=10)
    w.rec.sweeper = s
    w.fund(1000_00)
    w.instance("nb", L40S)
    w.tick()
    uid = w.kube.instance(NS, "nb")["metadata"]["uid"]
    assert s.when(uid) is not None
    del w.kube.namespaced[("gpuinstances", NS, "nb")]
    w.clock.advance(timedelta(hours=2))
    assert s.run_due() == 1
    assert s.when(uid) is None


def test_a_pass_leaves_the_body_it_was_given_as_it_was(world: World) -> None:
    """The sweeper hands a pass the watch-fed table's row, shared and not copied: the
    pass must not change it (an hour of storage, the cost and GPUs patched)."""
    w = world
    w.price("storage", "instancePerGBHour", "0.0005")
    w.fund(1000_00)
    w.instance("nb", L40S, quota=50)
    w.tick()
    body = copy.deepcopy(w.kube.instance(NS, "nb"))
    before = copy.deepcopy(body)
    w.clock.advance(timedelta(hours=1))
    w.rec.reconcile(body, wait=False)
    assert w.storage_charges() == 2  # the pass did its work on that body
    assert body == before


def test_with_a_lease_it_sweeps_only_while_kopf_works_here() -> None:
    """HA: a replica Kopf pauses (a live one of higher priority) stops sweeping within
    the lease; its due entries run once Kopf works here again."""
    clock, mono, ran = ManualClock(T0), Mono(), []
    s = Sweeper(clock, lambda ns, name, uid: ran.append(uid), retry_s=10, lease_s=70,
                monotonic=mono)  # fmt: skip
    s.due("u1", NS, "a", Due(at=T0, real_s=0))
    assert s.run_due() == 0  # no handler has run here yet
    s.alive()
    assert s.run_due() == 1
    s.due("u1", NS, "a", Due(at=T0, real_s=0))
    mono.t += 70.5  # no handler for longer than the lease: standing by
    assert s.run_due() == 0 and s.when("u1") is not None
    s.alive()
    assert s.run_due() == 1 and ran == ["u1", "u1"]


def test_the_thread_runs_what_falls_due_and_idles_while_standing_by() -> None:
    """The daemon thread: a due entry runs on the pool within a check; standing by, it
    waits a check at a time (no spin on the due entries it may not run)."""
    clock, ran = ManualClock(T0), []
    done = threading.Event()

    def run(ns: str, name: str, uid: str) -> None:
        ran.append(uid)
        done.set()

    s = Sweeper(clock, run, retry_s=10, check_s=0.05, lease_s=60)
    s.due("u1", NS, "a", Due(at=T0, real_s=0))
    s.start(lambda call: threading.Thread(target=call).start())
    time.sleep(0.3)  # standing by: nothing runs (no handler has run here)
    assert ran == []
    s.alive()
    assert done.wait(5) and ran == ["u1"]
