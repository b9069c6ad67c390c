"""Idle-GPU detection (docs/idle.md): the pure rule against an independent per-second
oracle (hypothesis), and the operator's idle room on the in-memory API double with a
real SQLite ledger fed real usage records (with activity) through its ingest path, on
the injected clock: status.idleSince, one notice per idle stretch, the opt-in stop
billed to the second, and the false-positive guards."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from gpucloud_operator import idle_gpus as ig
from hypothesis import given, settings
from hypothesis import strategies as st
from opworld import NS, T0, World

from gpucloud.crd.account import IdlePolicy
from gpucloud.ledger import GpuActivity
from gpucloud.testing.webhook import Hook, running_hook
from gpucloud.usage import Activity, GPURef, PodRef, UsageKind, UsageRecord

L40S = "NVIDIA-L40S"
GIB = 2**30
POLICY = IdlePolicy(utilizationPercent=5, graceMinutes=0, idleAfterMinutes=10,
                    notifyAfterMinutes=20, stopAfterMinutes=30)  # fmt: skip


# -- the pure rule against a per-second oracle -------------------------------------------
def oracle(
    seconds: dict[str, dict[int, int | None]], known_from: int, gpus: int, busy_above: int
) -> tuple[int, int] | None:
    """Per GPU, per second: the utilization sampled (None: reported, not sampled) or no
    entry (not reported). Idle since the last second after ``known_from`` that was not
    idle evidence on any GPU; seen until the earliest last reported second."""
    if len(seconds) < gpus:
        return None
    since, seen = known_from, None
    for per in seconds.values():
        last = max((s for s in per if s >= known_from), default=None)
        if last is None:
            return None
        for s in range(known_from, last + 1):
            util = per.get(s, "missing")
            if util == "missing" or util is None or util > busy_above:
                since = max(since, s + 1)
        seen = last + 1 if seen is None else min(seen, last + 1)
    assert seen is not None
    return (since, seen) if seen > since else None


windows = st.lists(
    st.tuples(
        st.integers(0, 1),  # gpu
        st.integers(0, 20),  # window index (10 s each)
        st.one_of(st.none(), st.integers(0, 100)),  # util (None: no activity sent)
    ),
    max_size=30,
    unique_by=lambda t: (t[0], t[1]),
)


@settings(max_examples=300, deadline=None)
@given(windows, st.integers(1, 2), st.integers(0, 50))
def test_idle_view_agrees_with_the_per_second_oracle(rows, gpus, known_from) -> None:  # type: ignore[no-untyped-def]
    policy = IdlePolicy(utilizationPercent=5)
    records, seconds = [], {}
    for gpu, k, util in rows:
        if gpu >= gpus:
            continue
        start = k * 10
        records.append(
            GpuActivity(
                f"GPU-{gpu}",
                start,
                start + 10,
                util,
                0 if util is not None else None,
                10 if util is not None else None,
            )
        )
        per = seconds.setdefault(f"GPU-{gpu}", {})
        for s in range(start, start + 10):
            per[s] = util
    got = ig.idle_view(records, gpus, known_from, policy)
    want = oracle(seconds, known_from, gpus, policy.utilization_percent)
    assert (None if got is None else (got.since, got.seen_until)) == want


def act(gpu: str, start: int, util: int, memory: int = 0, samples: int = 10) -> GpuActivity:
    return GpuActivity(gpu, start, start + 10, util, memory, samples)


def test_the_guards() -> None:
    quiet = [act("GPU-a", s, 0, memory=40 * GIB) for s in range(0, 600, 10)]
    # a model held in memory keeps it busy when the policy sets memoryMiB
    assert ig.idle_view(quiet, 1, 0, IdlePolicy(memoryMiB=1024)) is None
    view = ig.idle_view(quiet, 1, 0, IdlePolicy())
    assert view is not None and (view.since, view.seconds) == (0, 600)
    # a window mostly bridged (3 of 10 seconds sampled) is no evidence
    bridged = [*quiet[:30], act("GPU-a", 300, 0, samples=3), *quiet[31:]]
    assert ig.idle_view(bridged, 1, 0, IdlePolicy()).since == 310  # type: ignore[union-attr]
    # a gap (the agent was down) restarts the stretch after it
    gap = [r for r in quiet if not 200 <= r.start < 260]
    assert ig.idle_view(gap, 1, 0, IdlePolicy()).since == 260  # type: ignore[union-attr]
    # a data loader at 0% for 5 minutes between busy seconds is not idle (idleAfterMinutes)
    loader = [act("GPU-a", s, 0 if 100 <= s < 400 else 80) for s in range(0, 600, 10)]
    view = ig.idle_view(loader[:40], 1, 0, IdlePolicy())
    assert view is not None and view.seconds == 300
    assert ig.verdict(view, IdlePolicy()) == ig.IdleVerdict(idle=False, notify=False, stop=False)
    # one GPU of two idle: the instance is not
    two = quiet + [act("GPU-b", s, 90) for s in range(0, 600, 10)]
    assert ig.idle_view(two, 2, 0, IdlePolicy()) is None


# -- the operator's idle room --------------------------------------------------------------
@pytest.fixture
def hook(world: World) -> Iterator[Hook]:
    with running_hook() as server:
        world.kube.cluster[("accounts", "acme")]["spec"]["webhook"] = {"url": server.url}
        world.rec.notifier.backoff_s = 0.01
        yield server


def report(w: World, name: str, lo: int, hi: int, util: int, gpus: int = 1) -> None:
    """The agent's 10 s windows of the run's GPUs for [meterSince+lo, meterSince+hi)."""
    pod = w.kube.pods[(NS, f"{name}-gpu")]
    t0 = int(w.ledger.get_meter(w.status(name)["meterId"]).opened_at.timestamp())
    records = [
        UsageRecord(
            kind=UsageKind.GPU_TIME, node=pod["spec"]["nodeName"], start=t0 + s,
            end=t0 + s + 10, quantity=10, gpu=GPURef(uuid=f"GPU-{name}-{g}", product=L40S),
            pod=PodRef(namespace=NS, name=f"{name}-gpu", uid=pod["metadata"]["uid"]),
            activity=Activity(util_max_percent=util, memory_max_bytes=GIB, samples=10),
        )
        for g in range(gpus)
        for s in range(lo, hi, 10)
    ]  # fmt: skip
    if w.clock.now().timestamp() < t0 + hi:
        at(w, hi, name)  # the agent sends a window after it ended
    result = w.ledger.ingest_usage(records, received_at=w.clock.now(), rate_at=w.clock.now())
    assert result.rejected == []


def idle_world(w: World, **policy: object) -> World:
    w.fund(1000_00)
    w.kube.cluster[("accounts", "acme")]["spec"]["idle"] = {
        "graceMinutes": 0, "idleAfterMinutes": 10, "notifyAfterMinutes": 20, **policy
    }  # fmt: skip
    w.rec.idle_check_s = 0
    w.instance("nb", L40S, 2)
    w.tick()
    assert w.status("nb")["phase"] == "Running"
    return w


def at(w: World, seconds: int, name: str = "nb") -> None:
    """The clock at meterSince + seconds."""
    since = w.ledger.get_meter(w.status(name)["meterId"]).opened_at
    w.clock.set(since + timedelta(seconds=seconds))


def test_idle_since_shows_once_the_stretch_is_long_enough_and_activity_clears_it(
    world: World, hook: Hook
) -> None:
    w = idle_world(world)
    report(w, "nb", 0, 120, util=88, gpus=2)  # busy for 2 minutes
    report(w, "nb", 120, 600, util=0, gpus=2)  # then idle for 8
    at(w, 605)
    w.tick("nb")
    assert "idleSince" not in w.status("nb")  # 8 min < idleAfterMinutes 10
    report(w, "nb", 600, 900, util=2, gpus=2)  # 13 min at 2% (at most 5%: idle)
    at(w, 905)
    w.tick("nb")
    st = w.status("nb")
    since = w.ledger.get_meter(st["meterId"]).opened_at + timedelta(seconds=120)
    assert st["idleSince"] == since.isoformat().replace("+00:00", "Z")
    idle = next(c for c in st["conditions"] if c["type"] == "Idle")
    assert idle["status"] == "True" and "(13 min)" in idle["message"]
    assert hook.of_type("instance.idle") == []  # notifyAfterMinutes 20 not reached
    report(w, "nb", 900, 1500, util=0, gpus=2)  # 23 min idle
    at(w, 1505)
    for _ in range(3):
        w.tick("nb")
    assert w.rec.notifier.join(10)
    (sent,) = hook.of_type("instance.idle")
    assert sent["instance"] == "nb" and sent["idleSince"] == st["idleSince"]
    assert "GPUsIdle" in w.kube.reasons("nb")
    assert w.status("nb")["phase"] == "Running"  # no stopAfterMinutes: never stopped
    report(w, "nb", 1500, 1510, util=60, gpus=2)  # the notebook runs a cell
    at(w, 1515)
    w.tick("nb")
    assert "idleSince" not in w.status("nb")
    idle = next(c for c in w.status("nb")["conditions"] if c["type"] == "Idle")
    assert idle["status"] == "False"


def test_one_gpu_unknown_or_a_silent_agent_is_not_idle_evidence(world: World) -> None:
    w = idle_world(world)
    report(w, "nb", 0, 660, util=0)  # only GPU 0 reports: GPU 1 unknown
    at(w, 665)
    w.tick("nb")
    assert "idleSince" not in w.status("nb")
    # both report idle up to 12 min, then nothing for 15: idle for 12 min, not 27
    report(w, "nb", 660, 720, util=0)
    report(w, "nb", 0, 720, util=0, gpus=2)
    at(w, 720 + 900)
    w.tick("nb")
    st = w.status("nb")
    idle = next(c for c in st["conditions"] if c["type"] == "Idle")
    assert st["idleSince"] and "(12 min)" in idle["message"]


def test_the_opt_in_stop_keeps_the_data_and_bills_to_the_second(world: World) -> None:
    w = idle_world(world, stopAfterMinutes=30)
    report(w, "nb", 0, 60, util=70, gpus=2)
    report(w, "nb", 60, 1860, util=0, gpus=2)  # idle 30 min from +60
    at(w, 1867)
    w.tick("nb")
    st = w.status("nb")
    assert st["phase"] == "Stopped"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "IdleStopped" and "data is kept" in ready["message"]
    assert (NS, "nb-gpu") not in w.kube.pods
    assert (NS, "nb-data") in w.kube.pvcs  # the volume stays
    meter = next(m for m in w.ledger.meters("acme") if m.resource == f"{NS}/nb")
    assert (meter.closed_at - meter.opened_at).total_seconds() == 1867  # to the stop
    w.tick("nb")
    assert w.status("nb")["phase"] == "Stopped"  # stays down until the spec changes
    assert w.rec.counters.idle_stops.labels(L40S)._value.get() == 1


def test_a_package_instance_is_not_checked(world: World) -> None:
    """Its term is paid whatever the GPUs do (no GPU meter): nothing to notice or stop."""
    w = world
    w.fund(100000_00)
    w.kube.cluster[("accounts", "acme")]["spec"]["idle"] = {
        "graceMinutes": 0, "idleAfterMinutes": 10, "notifyAfterMinutes": 10,
        "stopAfterMinutes": 10,
    }  # fmt: skip
    w.rec.idle_check_s = 0
    w.instance("nb", L40S, 2, mode="Package", period="Day")
    w.tick()
    assert w.status("nb")["phase"] == "Running"
    w.clock.advance(3600)
    w.tick("nb")
    assert w.status("nb")["phase"] == "Running" and "idleSince" not in w.status("nb")
    assert w.rec.counters.idle_notices.labels(L40S)._value.get() == 0


def test_records_of_another_run_or_node_never_count(world: World) -> None:
    """Only what the run's meter admitted: a report for the pod from another node is
    refused at ingest, so it cannot make the instance look idle (or busy)."""
    w = idle_world(world)
    pod = w.kube.pods[(NS, "nb-gpu")]
    t0 = int(w.ledger.get_meter(w.status("nb")["meterId"]).opened_at.timestamp())
    forged = [
        UsageRecord(
            kind=UsageKind.GPU_TIME, node="gpu-a100-0", start=t0 + s, end=t0 + s + 10,
            quantity=10, gpu=GPURef(uuid=f"GPU-x-{g}", product=L40S),
            pod=PodRef(namespace=NS, name="nb-gpu", uid=pod["metadata"]["uid"]),
            activity=Activity(util_max_percent=0, memory_max_bytes=0, samples=10),
        )
        for g in range(2)
        for s in range(0, 1800, 10)
    ]  # fmt: skip
    at(w, 1805)
    result = w.ledger.ingest_usage(forged, received_at=w.clock.now(), rate_at=w.clock.now())
    assert len(result.rejected) == len(forged)
    w.tick("nb")
    assert "idleSince" not in w.status("nb")
    assert w.clock.now() > T0
