"""The refresh of what a running instance's status shows (accruedCost, gpus) without a
whole pass (gpucloud_operator.instances.refresh; the sweeper's rule 3a): every refresh
due at one check in one batch of ledger reads, the same figures a whole pass shows,
nothing posted, and the time rules still given their whole passes."""

from __future__ import annotations

from datetime import timedelta

import gpucloud_operator.instances.reconciler as reconciler
import gpucloud_operator.instances.settlement as settlement
import pytest
from gpucloud_operator.instances.sweeper import Sweeper
from opworld import NS, World
from test_run_settlement import usage

L40S, A100 = "NVIDIA-L40S", "NVIDIA-A100-SXM4-80GB"


class Mono:
    """One monotonic clock for the sweeper and the reconciler's rooms, moved when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def mono(monkeypatch: pytest.MonkeyPatch) -> Mono:
    m = Mono()
    monkeypatch.setattr(settlement, "monotonic", m)
    monkeypatch.setattr(reconciler, "monotonic", m)
    return m


def sweeping(w: World, mono: Mono, calls: dict[str, int]) -> tuple[Sweeper, list[str]]:
    """A sweeper over ``w`` with the batched refresh; the names its whole passes ran
    for; ``calls`` counts the ledger's reads of cost and GPUs, single and batched."""
    passes: list[str] = []

    def run(ns: str, name: str, uid: str) -> None:
        passes.append(name)
        w.rec.sweep_pass(ns, name, uid, w.kube.instance(ns, name))

    s = Sweeper(w.clock, run, retry_s=10, refresh=w.rec.refresh_shown, monotonic=mono)
    w.rec.sweeper = s
    for method in (
        "charges_by_resource",
        "charges_by_resources",
        "get_meter",
        "get_meters",
        "gpus_seen",
        "gpus_seen_by_pod",
    ):
        real = getattr(w.ledger, method)

        def counted(*a, _m=method, _real=real, **kw):  # type: ignore[no-untyped-def]
            calls[_m] = calls.get(_m, 0) + 1
            return _real(*a, **kw)

        setattr(w.ledger, method, counted)
    return s, passes


def three_running(w: World) -> None:
    w.cfg = w.cfg.with_overrides(
        {"cost_refresh_s": 60, "tick_interval_s": 10, "sweep_max_interval_s": 1800}
    )
    w.restart()
    w.fund(1000_00)
    w.instance("a", L40S, 1)
    w.instance("b", A100, 1)
    w.instance("c", L40S, 2)


def uid_of(w: World, name: str) -> str:
    return w.kube.instance(NS, name)["metadata"]["uid"]


def test_due_refreshes_are_one_batch_and_show_what_the_runs_cost(world: World, mono: Mono) -> None:
    w, calls = world, {}
    three_running(w)
    s, passes = sweeping(w, mono, calls)
    w.tick()
    assert all(w.status(n)["phase"] == "Running" for n in "abc")
    entries = len(w.ledger.entries("acme", limit=1000))
    w.ledger.ingest_usage(usage(w, "a", "GPU-a1", 0, 10), received_at=w.clock.now())
    calls.clear()
    # the first refresh: the GPUs' first lookup, and the cost never shown yet
    mono.t += 10
    assert s.run_due() == 3 and passes == []
    assert calls == {"charges_by_resources": 1, "get_meters": 1, "gpus_seen_by_pod": 1}
    assert w.status("a")["gpus"] == ["GPU-a1"] and "gpus" not in w.status("b")
    # the next of the first minute's lookups, of b and c (a's all shown): no usage was
    # stored since the last, so the ledger is not asked again
    calls.clear()
    mono.t += 10
    assert s.run_due() == 2 and passes == []
    assert calls == {}
    w.ledger.ingest_usage(usage(w, "c", "GPU-c1", 0, 10), received_at=w.clock.now())
    calls.clear()
    mono.t += 10
    assert s.run_due() == 2 and passes == []
    assert calls == {"gpus_seen_by_pod": 1}  # new usage: one query for both, no cost
    assert w.status("c")["gpus"] == ["GPU-c1"] and "gpus" not in w.status("b")
    # the cost refresh, 1,000 s of clock after the start (the hour's end is not due)
    calls.clear()
    w.clock.advance(1000)
    mono.t += 60
    assert s.run_due() == 3 and passes == []
    # with the cost, b's and c's GPUs are asked whatever the watermark (c: 1 of 2 shown)
    assert calls == {"charges_by_resources": 1, "get_meters": 1, "gpus_seen_by_pod": 1}
    # 5.20/h x 1,000 s = 1.444..; 9.80/h: 2.722..; 2 x 5.20/h: 2.888..; rounded once
    assert [w.status(n)["accruedCost"] for n in "abc"] == ["1.44", "2.72", "2.89"]
    assert len(w.ledger.entries("acme", limit=1000)) == entries  # nothing posted
    # a whole pass at the same instant shows the very same figures
    w.rec.cfg = w.cfg.with_overrides({"cost_refresh_s": 0})
    w.tick()
    assert [w.status(n)["accruedCost"] for n in "abc"] == ["1.44", "2.72", "2.89"]


def test_a_time_rule_still_gets_its_whole_pass(world: World, mono: Mono) -> None:
    w, calls = world, {}
    w.price("storage", "instancePerGBHour", "0.0005")
    three_running(w)
    s, passes = sweeping(w, mono, calls)
    w.tick()
    w.clock.advance(timedelta(hours=1))  # the storage hour's end, a refresh due too
    mono.t += 60
    assert s.run_due() == 3
    assert sorted(passes) == ["a", "b", "c"]  # whole passes, not refreshes
    assert w.storage_charges() == 3 * 2  # 50 GiB x 0.0005 for the hour, each


def test_an_unchanged_figure_is_not_patched_and_a_busy_instance_is_left_to_its_pass(
    world: World, mono: Mono
) -> None:
    w, calls = world, {}
    three_running(w)
    s, passes = sweeping(w, mono, calls)
    w.tick()
    patched: list[str] = []
    real_patch = w.kube.patch_status

    def patch(plural: str, ns: str | None, name: str, status: dict) -> dict:
        patched.append(name)
        return real_patch(plural, ns, name, status)

    w.kube.patch_status = patch  # type: ignore[method-assign]
    mono.t += 10  # no usage, the clock still: the same cost, no GPU to show
    assert s.run_due() == 3 and passes == []
    assert patched == ["a", "b", "c"]  # the first refresh shows the cost (0.00)
    mono.t += 60
    assert s.run_due() == 3 and passes == [] and patched == ["a", "b", "c"]  # unchanged
    w.clock.advance(60)
    mono.t += 60
    assert s.run_due() == 3 and patched == ["a", "b", "c"] * 2  # a minute more to show
    # a pass holds b's lock: its refresh is skipped and asked again at the busy pace
    lock = w.rec._lock(w.rec._locks, uid_of(w, "b"))
    with lock:
        mono.t += 60
        w.clock.advance(30)
        assert s.run_due() == 3 and patched == ["a", "b", "c"] * 2 + ["a", "c"]
    assert s.refresh_at(uid_of(w, "b")) == mono.t + w.cfg.tick_interval_s


def test_a_stopped_run_has_no_ticket_and_gets_no_refresh(world: World, mono: Mono) -> None:
    w, calls = world, {}
    three_running(w)
    s, _ = sweeping(w, mono, calls)
    w.tick()
    uid = uid_of(w, "a")
    assert w.rec._tickets.get(uid) is not None and s.refresh_at(uid) is not None
    w.kube.update_spec("gpuinstances", NS, "a", {"state": "Stopped"})
    w.tick("a")
    assert w.status("a")["phase"] == "Stopped"
    assert w.rec._tickets.get(uid) is None and s.refresh_at(uid) is None
