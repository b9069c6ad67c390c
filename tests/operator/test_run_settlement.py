"""Settlement of closed runs and status.gpus, against a real SQLite ledger: the agents'
usage (written straight into the ledger, as the API would) drives both."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from opworld import NS, World

from gpucloud.billing import to_minor
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord

L40S = "NVIDIA-L40S"
PRICE = Decimal("5.20")  # L40S pay-as-you-go per GPU-hour in examples/pricebook.yaml


def usage(w: World, name: str, gpu: str, lo: int, hi: int) -> list[UsageRecord]:
    """10 s windows of one GPU for the instance's current pod, [T0+lo, T0+hi)."""
    pod = w.kube.pods[(NS, f"{name}-gpu")]
    t0 = int(w.ledger.get_meter(w.status(name)["meterId"]).opened_at.timestamp())
    return [
        UsageRecord(
            kind=UsageKind.GPU_TIME,
            node=pod["spec"]["nodeName"],
            start=t0 + s,
            end=t0 + s + 10,
            quantity=10,
            gpu=GPURef(uuid=gpu, product=L40S),
            pod=PodRef(namespace=NS, name=f"{name}-gpu", uid=pod["metadata"]["uid"]),
        )
        for s in range(lo, hi, 10)
    ]


def charges(w: World) -> int:
    return -sum(e.amount_minor for e in w.ledger.entries("acme", limit=1000) if e.amount_minor < 0)


def gpu_charges(w: World) -> int:
    return -sum(
        e.amount_minor
        for e in w.ledger.entries("acme", limit=1000)
        if e.key.startswith(("meter:", "meter-fallback:"))
    )


def test_late_agent_usage_after_the_fallback_is_not_charged_again(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    meter_id = w.status("nb")["meterId"]
    early = usage(w, "nb", "GPU-1", 0, 400)
    late = usage(w, "nb", "GPU-1", 400, 1000)
    w.ledger.ingest_usage(early, received_at=w.clock.now())
    w.clock.advance(1000)
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    whole_run = to_minor(PRICE * 1000 / 3600)
    assert gpu_charges(w) == whole_run == 144  # 400 s metered + 600 s from the control plane
    fallback = w.ledger.get_entry(f"meter-fallback:{meter_id}")
    assert fallback.amount_minor == -(144 - to_minor(PRICE * 400 / 3600))
    assert fallback.meta["gpu_seconds"] == 600 and "control-plane timestamps" in fallback.memo
    assert "MeteringFallback" in w.kube.reasons("nb")
    assert "unsettledMeters" not in w.status("nb")
    balance = w.ledger.balance("acme")

    w.ledger.ingest_usage(late, received_at=w.clock.now(), rate_at=w.clock.now())
    w.ledger.rate_pending(w.clock.now())
    w.tick()
    assert w.ledger.balance("acme") == balance and gpu_charges(w) == 144
    m = w.ledger.get_meter(meter_id)
    assert (m.late_records, m.late_quantity, m.quantity_rated) == (60, 600, 400)
    assert m.settled_at is not None and m.fallback_quantity == 600


def test_a_fully_metered_run_is_settled_without_a_fallback(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    meter_id = w.status("nb")["meterId"]
    w.ledger.ingest_usage(usage(w, "nb", "GPU-1", 0, 1000), received_at=w.clock.now())
    straggler = usage(w, "nb", "GPU-2", 0, 30)  # say, a GPU the agent attributed late
    w.clock.advance(1000)
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    m = w.ledger.get_meter(meter_id)
    assert m.settled_at == w.clock.now() and (m.quantity_rated, m.fallback_minor) == (1000, 0)
    assert gpu_charges(w) == 144 and "MeteringFallback" not in w.kube.reasons("nb")
    # a straggler after the settlement changes nothing: a second GPU of a 1-GPU run is
    # refused outright (the run's one GPU is bound to its meter)
    result = w.ledger.ingest_usage(straggler, received_at=w.clock.now())
    assert set(result.rules.values()) == {"unbound_gpu"} and result.accepted == 0
    w.ledger.rate_pending(w.clock.now())
    assert gpu_charges(w) == 144 and w.ledger.get_meter(meter_id).late_records == 0


def test_status_gpus_lists_what_the_agents_saw(world: World) -> None:
    w = world
    w.cfg = w.cfg.with_overrides({"cost_refresh_s": 0})  # refresh on every tick
    w.restart()
    w.fund(100_00)
    w.instance("nb", L40S, 2)
    w.tick()
    assert w.status("nb")["phase"] == "Running" and "gpus" not in w.status("nb")
    w.ledger.ingest_usage(usage(w, "nb", "GPU-b", 0, 20), received_at=w.clock.now())
    w.tick()
    assert w.status("nb")["gpus"] == ["GPU-b"]  # unrated usage counts too
    w.clock.advance(30)
    w.ledger.ingest_usage(
        usage(w, "nb", "GPU-a", 0, 30), received_at=w.clock.now(), rate_at=w.clock.now()
    )
    w.tick()
    assert w.status("nb")["gpus"] == ["GPU-a", "GPU-b"]
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    assert "gpus" not in w.status("nb")  # the pod and its GPUs are gone
    # the next run has a new pod: only its own GPUs are listed
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Running"})
    w.clock.advance(timedelta(minutes=5))
    w.tick()
    assert w.status("nb")["phase"] == "Running" and "gpus" not in w.status("nb")
    w.ledger.ingest_usage(usage(w, "nb", "GPU-c", 0, 10), received_at=w.clock.now())
    w.tick()
    assert w.status("nb")["gpus"] == ["GPU-c"]


def test_gpus_no_agent_reported_are_looked_up_eagerly_only_in_the_run_s_first_minute(
    world: World, monkeypatch
) -> None:
    """A node whose agent never reports cost a ledger query on every tick: after the
    run's first ``gpus_eager_s`` the lookup waits for the cost refresh."""
    import gpucloud_operator.instances.settlement as settlement

    w = world
    real = [1000.0]
    monkeypatch.setattr(settlement, "monotonic", lambda: real[0])
    asked = lookups_counted(w, monkeypatch, cost_refresh_s=300, gpus=1)
    w.tick()
    assert w.status("nb")["phase"] == "Running"
    first = len(asked)
    w.tick()
    eager = len(asked)
    assert eager > first  # every pass asks
    real[0] += w.rec.gpus_eager_s
    w.tick()
    w.tick()
    assert len(asked) == eager  # an agent that has not reported by now: no query
    w.ledger.ingest_usage(usage(w, "nb", "GPU-b", 0, 20), received_at=w.clock.now())
    real[0] += w.cfg.cost_refresh_s
    w.tick()  # the cost refresh looks again
    assert len(asked) > eager and w.status("nb")["gpus"] == ["GPU-b"]


def test_once_every_gpu_of_the_run_is_shown_the_cost_refresh_asks_no_more(
    world: World, monkeypatch
) -> None:
    """The GPUs of a run do not change: once status.gpus lists as many as the run has,
    the cost refresh skips the ledger query, until the next run (a new pod)."""
    w = world
    asked = lookups_counted(w, monkeypatch, cost_refresh_s=0, gpus=2)  # refresh every tick
    w.tick()
    w.ledger.ingest_usage(usage(w, "nb", "GPU-b", 0, 20), received_at=w.clock.now())
    w.tick()
    assert w.status("nb")["gpus"] == ["GPU-b"]
    w.tick()
    assert len(set(asked)) == 1 and len(asked) >= 3  # one of two shown: still asking
    w.ledger.ingest_usage(usage(w, "nb", "GPU-a", 0, 20), received_at=w.clock.now())
    w.tick()
    assert w.status("nb")["gpus"] == ["GPU-a", "GPU-b"]
    before = len(asked)
    w.clock.advance(60)
    w.tick()
    w.tick()
    assert len(asked) == before  # both shown: nothing new to learn for this pod
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Running"})
    w.clock.advance(timedelta(minutes=5))
    w.tick()
    w.tick()
    assert w.status("nb")["phase"] == "Running"
    assert len(asked) > before and asked[-1] != asked[0]  # the new run's pod is asked


def lookups_counted(w: World, monkeypatch, *, cost_refresh_s: float, gpus: int) -> list[str]:
    """Instance nb (L40S x ``gpus``) funded, with ``cost_refresh_s``; the pod UIDs of the
    ledger's GPU lookups, in order."""
    w.cfg = w.cfg.with_overrides({"cost_refresh_s": cost_refresh_s})
    w.restart()
    asked: list[str] = []
    seen = w.ledger.gpus_seen
    monkeypatch.setattr(
        w.ledger, "gpus_seen", lambda pod, **kw: asked.append(pod) or seen(pod, **kw)
    )
    w.fund(100_00)
    w.instance("nb", L40S, gpus)
    return asked
