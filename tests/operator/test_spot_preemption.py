"""The spot preemption contract (docs/spot.md) on the in-memory API double, a real SQLite
ledger, a real webhook server and the injected clock: the notice reaches the pod (its
annotation, which the notice file shows) and the account's webhook once; a checkpoint
makes the pod stop its timeout before the deadline; billing is the spot rate up to the
stop and nothing after; ``spec.spot.resume`` queues the instance and starts a new run on
its node when GPUs free up."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from opworld import NS, World

from gpucloud.billing import to_minor
from gpucloud.crd import SpecError, parse
from gpucloud.crd.gpuinstance import GPUInstanceSpec
from gpucloud.ledger import EntryKind
from gpucloud.testing.webhook import Hook, running_hook

L40S = "NVIDIA-L40S"  # 4 GPUs on gpu-l40s-0 in the test world
NOTICE = "gpucloud.dev/preempt-at"


@pytest.fixture
def hook(world: World) -> Iterator[Hook]:
    """The account's webhook (Account.spec.webhook.url), and a notifier that retries fast."""
    with running_hook() as server:
        world.kube.cluster[("accounts", "acme")]["spec"]["webhook"] = {"url": server.url}
        world.rec.notifier.backoff_s = 0.01
        yield server


def gpu_charges(w: World) -> int:
    return -sum(
        e.amount_minor
        for e in w.ledger.entries("acme", limit=1000)
        if e.amount_minor < 0 and not e.key.startswith("storage:")
    )


def spot(w: World, name: str = "spot", count: int = 4, **options: object) -> None:
    w.instance(name, L40S, count, mode="Spot")
    if options:
        w.kube.update_spec("gpuinstances", NS, name, {"spot": options})


def preempt(w: World, at: int = 600) -> None:
    """``spot`` runs from T0; at T0 + ``at`` a pay-as-you-go start needs 2 of its GPUs."""
    w.tick()
    assert w.status("spot")["phase"] == "Running"
    w.clock.advance(at)
    w.instance("payg", L40S, 2)
    w.tick("payg")


def queued(w: World) -> World:
    """``spot`` (with resume) preempted by ``payg``, and queued."""
    w.fund(1000_00)
    spot(w, resume=True)
    preempt(w)
    w.clock.advance(120)
    w.tick()
    assert w.status("spot")["phase"] == "Queued"
    return w


def counter(w: World, name: str) -> float:
    metric = getattr(w.rec.spot_metrics, name)
    return metric.labels(L40S)._value.get()


def test_the_notice_reaches_the_pod_and_the_webhook_once(world: World, hook: Hook) -> None:
    w = world
    w.fund(1000_00)
    spot(w)
    preempt(w)
    st = w.status("spot")
    deadline = "2026-01-01T00:12:00Z"
    assert st["preemptAt"] == deadline and st["preemptNoticeAt"] == "2026-01-01T00:10:00Z"
    assert st["preemptStopAt"] == deadline  # no checkpoint: the pod stops at the deadline
    # the pod's annotation, which its downward-API notice file shows
    assert w.kube.pods[(NS, "spot-gpu")]["metadata"]["annotations"][NOTICE] == deadline
    assert "PreemptionNotice" in w.kube.reasons("spot")
    for _ in range(3):  # later passes of both instances deliver nothing again
        w.clock.advance(10)
        w.tick()
    assert w.rec.notifier.join(10)
    (sent,) = hook.of_type("spot.preemption")
    assert sent == {
        "type": "spot.preemption",
        "account": "acme",
        "message": sent["message"],
        "at": "2026-01-01T00:10:00Z",
        "instance": "spot",
        "namespace": NS,
        "stopAt": deadline,
        "checkpointAt": deadline,
        "reason": "GPUsNeeded",
        "resume": False,
    }
    assert "payg" not in sent["message"]  # the other tenant's instance is not named
    assert counter(w, "notices") == 1 and counter(w, "preemptions") == 0
    w.clock.advance(90)  # 00:12:00
    w.tick()
    assert w.status("spot")["phase"] == "Preempted" and counter(w, "preemptions") == 1
    assert "preemptStopAt" not in w.status("spot")  # the notice belonged to that run


def test_a_notice_a_crash_left_undelivered_is_delivered_by_the_victims_pass(
    world: World, hook: Hook
) -> None:
    """Killed after the notice was saved (crash point notice-given): the victim's next
    pass, in a new process, annotates the pod and calls the webhook, once."""
    w = world
    w.fund(1000_00)
    spot(w)
    w.tick()
    w.clock.advance(600)
    w.kube.patch_status(
        "gpuinstances",
        NS,
        "spot",
        {"preemptAt": "2026-01-01T00:12:00Z", "preemptNoticeAt": "2026-01-01T00:10:00Z"},
    )
    w.restart()
    w.rec.notifier.backoff_s = 0.01
    w.clock.advance(5)
    w.tick()
    w.tick()
    assert w.kube.pods[(NS, "spot-gpu")]["metadata"]["annotations"][NOTICE] == (
        "2026-01-01T00:12:00Z"
    )
    assert w.rec.notifier.join(10)
    assert [m["stopAt"] for m in hook.of_type("spot.preemption")] == ["2026-01-01T00:12:00Z"]
    assert w.status("spot")["preemptStopAt"] == "2026-01-01T00:12:00Z"


def test_a_checkpoint_stops_the_pod_its_timeout_before_the_deadline(
    world: World, hook: Hook
) -> None:
    """The pod is deleted (with its own grace period: the checkpoint's timeout, during
    which the kubelet runs the preStop hook) 30 s before the deadline, and billing ends
    there: the checkpoint's seconds are not billed, and the pod is gone by the deadline."""
    w = world
    w.fund(1000_00)
    spot(w, checkpoint={"command": ["sh", "-c", "sync"], "timeoutSeconds": 30})
    preempt(w)
    st = w.status("spot")
    assert st["preemptAt"] == "2026-01-01T00:12:00Z"
    assert st["preemptStopAt"] == "2026-01-01T00:11:30Z"
    assert w.rec.notifier.join(10)
    (sent,) = hook.of_type("spot.preemption")
    assert sent["checkpointAt"] == "2026-01-01T00:11:30Z" and "checkpoint: 30 s" in sent["message"]
    w.clock.advance(89)
    w.tick()
    assert w.status("spot")["phase"] == "Running"
    w.clock.advance(1)
    w.tick()
    assert w.status("spot")["phase"] == "Preempted"
    # deleted without a grace override: the pod's terminationGracePeriodSeconds (30) holds
    assert (NS, "spot-gpu", None) in w.kube.deleted_pods
    assert w.status("spot")["stoppedAt"] == "2026-01-01T00:11:30Z"
    w.clock.advance(61)
    w.tick()
    (meter,) = [m for m in w.ledger.meters("acme") if m.resource == f"{NS}/spot"]
    assert (meter.closed_at - meter.opened_at).total_seconds() == 690
    assert meter.posted_minor == to_minor(Decimal("2.60") * 4 * 690 / 3600) == 199


def test_a_checkpoint_the_operator_slept_through_still_bills_only_to_its_start(
    world: World,
) -> None:
    w = world
    w.fund(1000_00)
    spot(w, checkpoint={"command": ["sync"], "timeoutSeconds": 30})
    preempt(w)
    w.clock.advance(600)  # the operator was down past the deadline
    w.restart()
    w.tick()
    assert w.status("spot")["phase"] == "Preempted"
    assert w.status("spot")["stoppedAt"] == "2026-01-01T00:11:30Z"


def test_notice_to_stop_is_billed_at_the_spot_rate_exactly_and_nothing_after(
    world: World,
) -> None:
    """A product at 19.80/h pay-as-you-go and 6.93/h spot: the spot run, notice period
    included, is billed at 6.93 to the second up to the stop, rounded once; the instance
    that preempted it pays 19.80 from its own start; later ticks add nothing."""
    w = world
    pb = w.kube.cluster[("pricebooks", "default")]
    row = next(g for g in pb["spec"]["gpus"] if g["product"] == L40S)
    row |= {"payAsYouGoPerHour": "19.80", "spotPerHour": "6.93"}
    pb["metadata"]["resourceVersion"] = "2"
    w.fund(1000_00)
    spot(w)
    preempt(w, at=601)  # notice at 00:10:01, stop at 00:12:01
    w.clock.advance(120)
    w.tick()
    assert w.status("spot")["phase"] == "Preempted"
    assert w.status("payg")["phase"] == "Running"
    w.clock.advance(100)
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    meters = {m.resource.removeprefix(f"{NS}/"): m for m in w.ledger.meters("acme")}
    assert meters["spot"].unit_price == Decimal("6.93")
    assert (meters["spot"].closed_at - meters["spot"].opened_at).total_seconds() == 721
    spot_run = to_minor(Decimal("6.93") * 4 * 721 / 3600)  # 5.5518 -> 5.55
    payg_run = to_minor(Decimal("19.80") * 2 * 100 / 3600)  # 1.1 -> 1.10
    assert meters["spot"].posted_minor == spot_run == 555
    assert meters["payg"].posted_minor == payg_run == 110
    assert gpu_charges(w) == spot_run + payg_run
    w.clock.advance(1800)
    w.tick()
    assert gpu_charges(w) == spot_run + payg_run  # nothing after the stops


def test_resume_queues_then_starts_a_new_run_on_its_node_when_gpus_free_up(
    world: World, hook: Hook
) -> None:
    w = world
    w.fund(1000_00)
    spot(w, resume=True)
    preempt(w)
    node = w.status("spot")["volumeNode"]
    w.clock.advance(120)
    w.tick()
    st = w.status("spot")
    assert st["phase"] == "Queued" and "haltedGeneration" not in st
    assert (NS, "spot-gpu") not in w.kube.pods and w.status("payg")["phase"] == "Running"
    assert w.rec.notifier.join(10)
    assert hook.of_type("spot.preemption")[0]["resume"] is True
    (first_meter,) = st["unsettledMeters"]
    # queued: no pod, no meter, nothing billed for GPUs, whatever the ticks
    for _ in range(3):
        w.clock.advance(300)
        w.tick()
    st = w.status("spot")
    assert st["phase"] == "Queued" and f"free GPU(s) on {node}" in st["message"]
    assert (NS, "spot-gpu") not in w.kube.pods
    assert [m.meter_id for m in w.ledger.meters("acme", open_only=True)] == [
        w.status("payg")["meterId"]
    ]
    assert counter(w, "resumes") == 0
    # the pay-as-you-go instance stops: the node has room, the spot run 2 starts there
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()  # payg stops; spot finds room, is admitted and its pod created
    w.tick()  # the pod runs
    st = w.status("spot")
    assert st["phase"] == "Running" and st["runs"] == 2 and st["node"] == node
    assert st["meterId"] != first_meter and st["meterSince"] == "2026-01-01T00:27:00Z"
    assert "Resuming" in w.kube.reasons("spot") and counter(w, "resumes") == 1
    w.clock.advance(100)
    w.kube.update_spec("gpuinstances", NS, "spot", {"state": "Stopped"})
    w.tick()
    w.clock.advance(61)
    w.tick()
    spot_meters = [m for m in w.ledger.meters("acme") if m.resource == f"{NS}/spot"]
    assert [m.posted_minor for m in spot_meters] == [
        to_minor(Decimal("2.60") * 4 * 720 / 3600),  # run 1: to the preemption
        to_minor(Decimal("2.60") * 4 * 100 / 3600),  # run 2: from its own start
    ]


def test_a_queued_instance_is_taken_off_the_queue_by_a_stop(world: World) -> None:
    w = queued(world)
    w.kube.update_spec("gpuinstances", NS, "spot", {"state": "Stopped"})
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()
    assert w.status("spot")["phase"] == "Stopped" and (NS, "spot-gpu") not in w.kube.pods


def test_arrears_take_a_queued_instance_off_the_queue(world: World) -> None:
    """Arrears shut instances down until the user starts them again: a queued one too,
    or it would start on its own once the debt is paid."""
    w = queued(world)
    w.ledger.post_entry("acme", EntryKind.ADJUSTMENT, -2000_00, "debt", at=w.clock.now())
    w.kube.cluster[("accounts", "acme")]["status"] = {
        "state": "Arrears",
        "arrearsSince": "2026-01-01T00:12:00Z",
        "dataDeletionAt": "2026-01-08T00:12:00Z",
    }
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()
    st = w.status("spot")
    assert st["phase"] == "Stopped" and "taken off the resume queue" in st["message"]
    w.fund(5000_00, "repaid")
    w.kube.cluster[("accounts", "acme")]["status"] = {"state": "Active"}
    w.tick()
    assert w.status("spot")["phase"] == "Stopped" and (NS, "spot-gpu") not in w.kube.pods


def test_a_queued_instance_refused_at_its_resume_holds_no_gpus(world: World) -> None:
    """Its turn comes but spot is no longer offered for the product: it is Refused (tried
    again on every pass, as any refusal) and counts on no GPUs of its node meanwhile."""
    w = queued(world)
    pb = w.kube.cluster[("pricebooks", "default")]
    next(g for g in pb["spec"]["gpus"] if g["product"] == L40S).pop("spotPerHour")
    pb["metadata"]["resourceVersion"] = "2"
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()
    assert w.status("spot")["phase"] == "Refused" and "NotOffered" in w.kube.reasons("spot")
    assert w.kube.instance(NS, "spot")["metadata"]["uid"] not in w.rec._assumed
    assert counter(w, "resumes") == 0


def test_a_run_no_pod_list_ever_showed_holds_no_gpus_once_it_stops(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's pod list is cached for seconds: a run that starts and stops inside
    that time is never listed. Its placement, counted meanwhile, must end with the run,
    or the queued instance waits forever for GPUs that are free."""
    listed = world.kube.gpu_pods
    monkeypatch.setattr(
        world.kube,
        "gpu_pods",
        lambda ttl=0.0, resource="nvidia.com/gpu": [
            x for x in listed(resource=resource) if x["name"] != "payg-gpu"
        ],
    )
    w = queued(world)
    w.tick()
    assert w.status("spot")["phase"] == "Queued"  # payg's placement holds 2 of the 4 GPUs
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick()
    w.tick()
    assert w.status("spot")["phase"] == "Running" and w.status("spot")["runs"] == 2


def test_two_queued_instances_do_not_count_on_the_same_gpus(world: World) -> None:
    w = world
    w.fund(1000_00)
    spot(w, "a", 2, resume=True)
    spot(w, "b", 2, resume=True)
    w.tick()
    w.clock.advance(600)
    w.instance("payg", L40S, 4)
    w.tick("payg")
    w.clock.advance(120)
    w.tick("a", "b")
    assert {w.status(n)["phase"] for n in ("a", "b")} == {"Queued"}
    w.kube.update_spec("gpuinstances", NS, "payg", {"state": "Stopped"})
    w.tick("payg")
    w.instance("other", L40S, 2)  # takes 2 of the 4 freed GPUs first
    w.tick("other")
    w.tick("a", "b")
    phases = sorted(w.status(n)["phase"] for n in ("a", "b"))
    assert phases == ["Queued", "Running"]


def test_a_checkpoint_longer_than_the_notice_refuses_the_start(world: World) -> None:
    w = world
    w.fund(1000_00)
    spot(w, checkpoint={"command": ["sync"], "timeoutSeconds": 121})
    w.tick()
    st = w.status("spot")
    assert st["phase"] == "Refused" and not w.kube.pods
    assert st["message"] == (
        "spec.spot.checkpoint.timeoutSeconds: 121 s is longer than the preemption notice "
        "(120 s, the operator's preemption_grace_s); the checkpoint must fit in it"
    )
    w.kube.update_spec("gpuinstances", NS, "spot", {"spot": {"checkpoint": {"command": ["s"]}}})
    w.tick()
    assert w.status("spot")["phase"] == "Running"


def test_spot_options_only_with_spot_billing() -> None:
    spec = {"gpu": {"product": L40S}, "billing": {"mode": "PayAsYouGo"}, "spot": {"resume": True}}
    with pytest.raises(SpecError, match=r"spec\.spot: spot is only allowed when billing\.mode"):
        parse(GPUInstanceSpec, spec)
    spec["billing"] = {"mode": "Spot"}
    assert parse(GPUInstanceSpec, spec).spot.resume is True
    spec["spot"] = {"checkpoint": {"command": []}}
    with pytest.raises(SpecError, match=r"spec\.spot\.checkpoint\.command"):
        parse(GPUInstanceSpec, spec)


class Asked:
    """Stands in for the reconciler's delayed-call thread: records what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def call(self, delay_s: float, fn: object) -> None:
        self.calls.append((delay_s, fn))


def test_the_stop_is_asked_for_at_its_instant_not_at_the_next_tick(world: World) -> None:
    """The notice's stop instant (the deadline less the checkpoint's timeout) gets a pass
    of its own: at that instant the pod stops, with no timer tick in between."""
    w = world
    w.fund(1000_00)
    asked = Asked()
    w.rec._later = asked  # type: ignore[assignment]
    spot(w, checkpoint={"command": ["sh", "-c", "sync"], "timeoutSeconds": 30})
    preempt(w)
    assert w.status("spot")["preemptStopAt"] == "2026-01-01T00:11:30Z"
    (_, run), *_ = [c for c in asked.calls if c[0] == 90.0]  # 00:10:00 -> 00:11:30
    w.clock.advance(89)
    run()  # type: ignore[operator]
    assert w.status("spot")["phase"] == "Running"  # a second early: nothing happens
    w.clock.advance(1)
    run()  # type: ignore[operator]
    assert w.status("spot")["phase"] == "Preempted"
    assert (NS, "spot-gpu") not in w.kube.pods
    assert w.status("spot")["stoppedAt"] == "2026-01-01T00:11:30Z"  # billed to it
    (meter,) = [m for m in w.ledger.meters("acme") if m.resource == f"{NS}/spot"]
    assert (meter.closed_at - meter.opened_at).total_seconds() == 690
