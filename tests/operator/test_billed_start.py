"""A run is billed from when Kubernetes says its pod started, not from when the operator
looked; deadlines (spot notice, package expiry) that passed while the operator was down
stop the instance at the deadline. The operator's death is a restart of the reconciler
(nothing kept in memory) after the clock moved; the e2e tests kill the real process."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gpucloud_operator import rules as r
from gpucloud_operator.placement import NodeGPUs
from opworld import NS, T0, World

from gpucloud.billing import to_minor
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord

L40S = "NVIDIA-L40S"
A100 = "NVIDIA-A100-SXM4-80GB"
H100_SPOT = Decimal("9.90")
WALL = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)  # the cluster's clock: not the operator's


def charges(w: World) -> int:
    return -sum(e.amount_minor for e in w.ledger.entries("acme", limit=1000) if e.amount_minor < 0)


def gpu_charges(w: World, name: str) -> int:
    return -sum(
        e.amount_minor
        for e in w.ledger.entries("acme", limit=1000)
        if e.key.startswith("meter") and e.resource == f"{NS}/{name}"
    )


def pod(created: datetime, *starts: tuple[str, datetime], ready: datetime | None = None) -> dict:
    statuses = [
        {"state": {"running": {"startedAt": r.fmt(t)}}}
        if which == "running"
        else {"lastState": {"terminated": {"startedAt": r.fmt(t)}}}
        for which, t in starts
    ]
    conds = []
    if ready is not None:
        conds = [{"type": "Ready", "status": "True", "lastTransitionTime": r.fmt(ready)}]
    return {
        "metadata": {"creationTimestamp": r.fmt(created)},
        "status": {"containerStatuses": statuses, "conditions": conds},
    }


def test_billed_start_rule() -> None:
    now = T0 + timedelta(seconds=900)
    started_7s_after = pod(WALL, ("running", WALL + timedelta(seconds=7)))
    # the kubelet's delay after creation, added to the operator's anchor: clocks may differ
    assert r.billed_start(T0, started_7s_after, now) == T0 + timedelta(seconds=7)
    # a restarted container: its first start counts, not the restart
    restarted = pod(
        WALL,
        ("running", WALL + timedelta(seconds=300)),
        ("terminated", WALL + timedelta(seconds=3)),
    )
    assert r.billed_start(T0, restarted, now) == T0 + timedelta(seconds=3)
    # no container start recorded: the Ready transition
    assert r.billed_start(T0, pod(WALL, ready=WALL + timedelta(seconds=4)), now) == T0 + timedelta(
        seconds=4
    )
    # skewed clocks (kubelet behind the API server): never before the pod existed
    assert r.billed_start(T0, pod(WALL, ("running", WALL - timedelta(seconds=5))), now) == T0
    # never after now, never before the operator saw it waiting unscheduled
    assert r.billed_start(T0, started_7s_after, T0 + timedelta(seconds=2)) == T0 + timedelta(
        seconds=2
    )
    waited = T0 + timedelta(seconds=600)
    assert r.billed_start(T0, started_7s_after, now, waiting=waited) == waited
    # nothing to go by (an older operator's pod, no start recorded): when it was seen
    assert r.billed_start(None, started_7s_after, now) == now
    assert r.billed_start(T0, pod(WALL), now) == now
    assert r.second_up(T0 + timedelta(microseconds=1)) == T0 + timedelta(seconds=1)
    assert r.second_up(T0) == T0


def test_a_run_started_while_the_operator_was_down_is_billed_from_its_pod_start(
    world: World,
) -> None:
    w = world
    w.fund(100_00)
    w.kube.start_delay_s = 3  # the kubelet starts the container 3 s after the pod's creation
    w.instance("nb", L40S, 2)
    w.rec.reconcile_named(NS, "nb")  # the pass that creates the pod ...
    assert (NS, "nb-gpu") in w.kube.pods and w.status("nb")["podCreatedAt"] == r.fmt(T0)
    w.kube.schedule()  # ... the pod runs; the operator dies before it sees that
    w.clock.advance(600)
    w.restart()
    w.tick()
    st = w.status("nb")
    start = T0 + timedelta(seconds=3)
    assert st["phase"] == "Running" and st["startedAt"] == st["meterSince"] == r.fmt(start)
    assert st["storageSince"] == r.fmt(start)
    assert w.ledger.get_meter(st["meterId"]).opened_at == start
    started = [m for _, _, reason, m in w.kube.events if reason == "Started"]
    assert "since 2026-01-01T00:00:03Z" in started[-1]
    w.clock.advance(400)
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    assert gpu_charges(w, "nb") == to_minor(Decimal("5.20") * 2 * 997 / 3600) == 288


def test_usage_the_agents_recorded_before_the_meter_opened_is_charged(world: World) -> None:
    """The agent meters the pod from its start while the operator is down: when the
    meter opens (back in time, at the pod's start) that usage is rated, and the run is
    settled without any control-plane fallback."""
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.rec.reconcile_named(NS, "nb")
    w.kube.schedule()
    pod_ = w.kube.pods[(NS, "nb-gpu")]
    t0 = int(T0.timestamp())
    records = [
        UsageRecord(
            kind=UsageKind.GPU_TIME,
            node=pod_["spec"]["nodeName"],
            start=t0 + s,
            end=t0 + s + 10,
            quantity=10,
            gpu=GPURef(uuid="GPU-0", product=L40S),
            pod=PodRef(namespace=NS, name="nb-gpu", uid=pod_["metadata"]["uid"]),
        )
        for s in range(0, 700, 10)
    ]
    w.clock.advance(350)
    w.ledger.ingest_usage(records[:35], received_at=w.clock.now())  # no meter yet
    w.clock.advance(350)
    w.restart()
    w.tick()
    w.ledger.ingest_usage(records[35:], received_at=w.clock.now(), rate_at=w.clock.now())
    w.ledger.rate_pending(w.clock.now())
    assert charges(w) == to_minor(Decimal("5.20") * 700 / 3600) == 101  # before the stop
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    meter = w.ledger.meters("acme")[0]
    assert meter.settled_at is not None and meter.fallback_minor == 0
    assert gpu_charges(w, "nb") == 101 and w.ledger.unrated_usage() == []


def test_a_spot_notice_that_ran_out_while_the_operator_was_down_stops_at_its_deadline(
    world: World,
) -> None:
    w = world
    w.fund(1000_00)
    w.instance("spot", L40S, 4, mode="Spot")
    w.tick()
    w.clock.advance(600)
    w.instance("payg", L40S, 2)
    w.tick()
    assert w.status("spot")["preemptAt"] == "2026-01-01T00:12:00Z"
    w.clock.advance(120 + 1800)  # the operator was down through the deadline
    w.restart()
    w.tick()  # the first pass after the restart
    st = w.status("spot")
    assert st["phase"] == "Preempted" and st["stoppedAt"] == "2026-01-01T00:12:00Z"
    # the instance the GPUs were freed for waited until they were: billed from then
    payg = w.status("payg")
    assert payg["phase"] == "Running" and payg["startedAt"] == "2026-01-01T00:42:00Z"
    w.clock.advance(61)
    w.tick()
    assert gpu_charges(w, "spot") == to_minor(Decimal("2.60") * 4 * 720 / 3600) == 208


def test_a_package_that_expired_while_the_operator_was_down_stops_at_its_expiry(
    world: World,
) -> None:
    w = world
    w.fund(1000_00)
    w.instance("day", L40S, 1, mode="Package", period="Day")
    w.tick()
    assert w.status("day")["packageExpiresAt"] == "2026-01-02T00:00:00Z"
    w.clock.advance(timedelta(days=1, hours=5))
    w.restart()
    w.tick()
    st = w.status("day")
    assert st["phase"] == "Expired" and st["stoppedAt"] == "2026-01-02T00:00:00Z"
    assert (NS, "day-gpu") not in w.kube.pods
    assert charges(w) == 112_00 + to_minor(Decimal("0.0004") * 50 * 5)  # storage after expiry


def test_a_run_stopped_before_the_operator_saw_it_running_is_billed(world: World) -> None:
    """The pod ran while the operator was down, and the user stopped the instance before
    it came back: the run is still billed, from its start to the stop."""
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.rec.reconcile_named(NS, "nb")
    w.kube.schedule()
    w.clock.advance(300)
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.restart()
    w.tick()
    st = w.status("nb")
    assert st["phase"] == "Stopped" and st["startedAt"] == r.fmt(T0)
    assert st["stoppedAt"] == "2026-01-01T00:05:00Z"
    w.clock.advance(61)
    w.tick()
    assert gpu_charges(w, "nb") == to_minor(Decimal("5.20") * 300 / 3600) == 43


def test_a_new_process_counts_the_volumes_another_one_placed(world: World) -> None:
    """A replica died mid-burst after pinning volumes to a node, before their pods
    existed: the process that takes over must not pin more to that node than it has
    GPUs (its own in-memory placements died with the other one)."""
    w = world
    w.fund(10_000_00)
    w.kube.nodes.append(NodeGPUs("gpu-a100-1", A100, 8))
    w.kube.cluster[("accounts", "acme")]["spec"]["instanceLimit"] = 20
    for i in range(8):
        w.instance(f"old{i}", A100, 1)
        w.kube.patch_status(
            "gpuinstances",
            NS,
            f"old{i}",
            {"phase": "Pending", "runs": 1, "volumeNode": "gpu-a100-0"},
        )
    w.restart()
    w.instance("new", A100, 1)
    w.rec.reconcile_named(NS, "new")
    assert w.status("new")["volumeNode"] == "gpu-a100-1"
