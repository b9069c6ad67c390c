from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from gpucloud_operator import builders as b
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.kube import Kube
from gpucloud_operator.later import Later
from gpucloud_operator.placement import (
    NodeGPUs,
    PodGPUs,
    choose_node,
    fallback_node,
    plan_preemption,
)
from opfake import FakeKube
from opworld import NS, World

NODES = [
    NodeGPUs("l40s-0", "L40S", 4),
    NodeGPUs("l40s-1", "L40S", 8),
    NodeGPUs("a100-0", "A100", 8),
]


def pod(node: str, gpus: int, spot: bool, minute: int, name: str = "", **kw: bool) -> PodGPUs:
    return PodGPUs(
        "ns",
        name or f"{node}-{minute}",
        node,
        gpus,
        spot,
        datetime(2026, 1, 1, 0, minute, tzinfo=UTC),
        **kw,
    )


def test_best_fit_and_fallback() -> None:
    assert choose_node(NODES, [], "L40S", 4) == "l40s-0"  # leaves the 8-GPU node whole
    assert choose_node(NODES, [pod("l40s-0", 1, False, 0)], "L40S", 4) == "l40s-1"
    assert choose_node(NODES, [], "H100", 1) is None
    full = [pod("l40s-0", 4, False, 0), pod("l40s-1", 8, False, 1)]
    assert choose_node(NODES, full, "L40S", 2) is None
    assert fallback_node(NODES, "L40S", 6) == "l40s-1"
    assert fallback_node(NODES, "L40S", 9) is None


def test_preempts_fewest_spot_youngest_first_never_others() -> None:
    pods = [
        pod("l40s-0", 2, True, 1, "old"),
        pod("l40s-0", 2, True, 5, "young"),
        pod("l40s-1", 2, True, 9, "s1"),
        pod("l40s-1", 2, True, 8, "s2"),
        pod("l40s-1", 4, False, 0, "payg"),
    ]
    plan = plan_preemption(NODES, pods, "L40S", 2)
    assert plan is not None and plan.node == "l40s-0"
    assert [v.instance for v in plan.victims] == ["young"]
    plan = plan_preemption(NODES, pods, "L40S", 4, only_node="l40s-1")
    assert plan is not None and {v.instance for v in plan.victims} == {"s1", "s2"}
    assert plan_preemption(NODES, pods, "L40S", 6, only_node="l40s-1") is None  # payg is safe


def test_no_preemption_when_room_is_free_or_being_freed() -> None:
    assert plan_preemption(NODES, [], "L40S", 2) is None
    noticed = [pod("l40s-0", 4, True, 1, "s", preempting=True), pod("l40s-1", 8, True, 2)]
    assert plan_preemption(NODES, noticed, "L40S", 4) is None


# -- the start path under concurrency (the operator runs passes in a thread pool) ------
class SerialKube:
    """The fake kube behind one lock (its dicts are not thread-safe), with a slow status
    patch so that concurrent starts overlap while claiming their runs."""

    def __init__(self, inner: FakeKube, bound: set[str] | None = None) -> None:
        self.inner = inner
        self.bound = bound  # claims bound so far (None: bound as soon as created)
        self.calls: Counter[str] = Counter()
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "patch_status":
                time.sleep(0.01)
            with self._lock:
                self.calls[name] += 1
                return attr(*args, **kwargs)

        return call if callable(attr) else attr

    @property
    def reads(self) -> int:
        return self.calls["get_namespaced_object"]

    def pvc_bound(self, namespace: str, name: str) -> bool:
        self.calls["pvc_bound"] += 1
        if self.bound is None:
            return self.inner.pvc_bound(namespace, name)
        return name in self.bound


def test_concurrent_starts_keep_the_instance_limit(world: World) -> None:
    world.fund(10**9)
    kube = SerialKube(world.kube)
    rec = InstanceReconciler(kube, world.ledger, world.clock, world.cfg)  # type: ignore[arg-type]
    names = [f"i{n}" for n in range(8)]
    for name in names:
        world.instance(name, "NVIDIA-A100-SXM4-80GB")
    threads = [threading.Thread(target=rec.reconcile_named, args=(NS, n)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    phases = [world.status(n).get("phase") for n in names]
    assert phases.count("Pending") == 3  # the account's instanceLimit
    assert phases.count("Refused") == 5
    assert all(
        "instanceLimit is 3" in world.status(n)["message"]
        for n in names
        if world.status(n)["phase"] == "Refused"
    )
    assert len(world.kube.pods) == 3


def test_claim_bind_event_creates_the_pod(world: World) -> None:
    world.fund(10**9)
    kube = SerialKube(world.kube, bound=set())
    rec = InstanceReconciler(kube, world.ledger, world.clock, world.cfg)  # type: ignore[arg-type]
    world.instance("a", "NVIDIA-A100-SXM4-80GB")
    rec.reconcile_named(NS, "a")
    assert world.status("a")["phase"] == "Pending"
    assert "waiting for the instance volume to bind" in world.status("a")["message"]
    assert not world.kube.pods
    claim = copy.deepcopy(world.kube.pvcs[(NS, b.pvc_name("a"))])
    reads = kube.reads
    rec.claim_changed(claim | {"status": {"phase": "Pending"}}, deleted=False)
    assert kube.reads == reads  # not bound yet: no pass
    kube.bound.add(b.pvc_name("a"))
    rec.claim_changed(claim | {"status": {"phase": "Bound"}}, deleted=False)
    assert (NS, b.pod_name("a")) in world.kube.pods  # the bind started the pass at once
    assert "Starting" in world.kube.reasons("a")
    reads = kube.reads
    rec.claim_changed(claim | {"status": {"phase": "Bound"}}, deleted=False)
    assert kube.reads == reads  # nobody waits for that claim any more


def test_a_start_asks_the_api_server_only_what_its_events_did_not_say(world: World) -> None:
    """A burst of starts is bound by API requests: the bind wait goes out with the
    Pending patch, the billing anchor is the one write added before the pod, and the
    passes the claim's bind and the pod's Running events start read neither the claim
    nor the pod again."""
    world.fund(10**9)
    kube = SerialKube(world.kube, bound=set())
    rec = InstanceReconciler(kube, world.ledger, world.clock, world.cfg)  # type: ignore[arg-type]
    world.instance("a", "NVIDIA-A100-SXM4-80GB")
    rec.reconcile_named(NS, "a")
    assert kube.calls["patch_status"] == 1
    assert world.status("a")["phase"] == "Pending"
    assert world.status("a")["message"].startswith("waiting for the instance volume to bind")
    asked = kube.calls["pvc_bound"]  # the fake's new claim has no status: asked once
    claim = copy.deepcopy(world.kube.pvcs[(NS, b.pvc_name("a"))])
    kube.bound.add(b.pvc_name("a"))
    rec.claim_changed(claim | {"status": {"phase": "Bound"}}, deleted=False)
    assert (NS, b.pod_name("a")) in world.kube.pods
    world.kube.schedule()
    pod = copy.deepcopy(world.kube.pods[(NS, b.pod_name("a"))])
    rec.pod_changed(pod, deleted=False)
    assert world.status("a")["phase"] == "Running"
    assert kube.calls["get_pod"] == 0 and kube.calls["pvc_bound"] == asked
    # Pending, the billing anchor saved just before the pod is created (its own write:
    # it must precede the pod, rules.billed_start), Running
    assert kube.calls["patch_status"] == 3
    # an event of another pod of the same name and run is not taken for this run's pod
    impostor = copy.deepcopy(pod)
    impostor["metadata"]["uid"] = "another-pod"
    rec._reconcile_fresh(NS, "a", world.kube.instance(NS, "a")["metadata"]["uid"], wait=True,
                         pod_seen=impostor)  # fmt: skip
    assert kube.calls["get_pod"] + kube.calls["seen_pod"] == 1  # asked of the pods' view


def test_an_event_body_without_status_is_not_trusted_once_a_pass_patched_it(
    world: World,
) -> None:
    """A timer or a lagging watch may hand over the body from before the first pass's
    patch: the pass reads the instance instead of starting it a second time."""
    world.fund(10**9)
    kube = SerialKube(world.kube)
    rec = InstanceReconciler(kube, world.ledger, world.clock, world.cfg)  # type: ignore[arg-type]
    body = world.instance("a", "NVIDIA-A100-SXM4-80GB")
    rec.reconcile(copy.deepcopy(body))  # the creation: no read, the body is fresh
    assert kube.reads == 0 and world.status("a")["runs"] == 1
    rec.reconcile(copy.deepcopy(body))  # the same body again, after the pass patched it
    assert kube.reads == 1 and world.status("a")["runs"] == 1


def test_cached_loads_once_for_concurrent_callers() -> None:
    kube = Kube.__new__(Kube)  # only the cache: no cluster needed
    kube._init_cache()
    loads: list[int] = []

    def load() -> list[int]:
        time.sleep(0.05)
        loads.append(1)
        return [len(loads)]

    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(kube._cached("k", 5.0, load))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(loads) == 1 and got == [[1]] * 8
    time.sleep(0.01)
    assert kube._cached("k", 0.005, load) == [2]  # expired: loaded again


class ClaimKube(SerialKube):
    """Claims that get a uid and stay unbound; their volume shows ``pv_phase``."""

    def __init__(self, inner: FakeKube, pv_phase: str) -> None:
        super().__init__(inner, bound=set())
        self.pv_phase = pv_phase
        self.touched: list[dict[str, str]] = []
        self.looks = 0

    def ensure_pvc(self, pvc: Any) -> Any:
        with self._lock:
            self.inner.ensure_pvc(pvc)
        return {**pvc, "metadata": {**pvc["metadata"], "uid": "claim-uid"}, "status": {}}

    def annotate_pvc(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        with self._lock:
            self.touched.append(annotations)

    def get_pv(self, name: str) -> Any:
        with self._lock:
            self.looks += 1
            pv = self.inner.pvs.get(name)
            return pv and {**pv, "status": {"phase": self.pv_phase}}


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start_and_look(world: World, pv_phase: str) -> tuple[ClaimKube, InstanceReconciler]:
    """Start instance ``a`` (its claim stays unbound) and wait for the last look."""
    world.fund(10**9)
    kube = ClaimKube(world.kube, pv_phase=pv_phase)
    rec = InstanceReconciler(kube, world.ledger, world.clock, world.cfg)  # type: ignore[arg-type]
    rec.claim_recheck_s = 0.01
    world.instance("a", "NVIDIA-A100-SXM4-80GB")
    rec.reconcile_named(NS, "a")
    wait_for(lambda: rec._later.ran == (4 if pv_phase == "Bound" else 6))
    return kube, rec


def test_a_claim_the_volume_controller_missed_is_touched_again(world: World) -> None:
    """The volume is Bound but its claim is not: the PV controller synced the claim
    before it knew the volume. The claim is updated again, each time with a new value,
    at longer and longer intervals, until it binds or the looks run out."""
    kube, rec = start_and_look(world, pv_phase="Bound")
    uid = world.kube.namespaced[("gpuinstances", NS, "a")]["metadata"]["uid"]
    assert kube.touched[0] == {"gpucloud.dev/volume": b.pv_name(uid)}
    syncs = [t["gpucloud.dev/volume-sync"] for t in kube.touched[1:]]
    assert len(syncs) == len(set(syncs)) == 4  # a new value each time: a real update
    rec.claim_recheck_s = 60.0
    rec.reconcile_named(NS, "a")  # later passes find the claim unbound: one new chain
    rec.reconcile_named(NS, "a")
    assert len(rec._later._heap) == 1


def test_a_claim_waiting_on_a_busy_volume_controller_is_left_alone(world: World) -> None:
    """The volume is not Bound yet: the controller has not got to it (its client rate),
    so another update would only add work. Once the claim binds, nobody looks again."""
    kube, rec = start_and_look(world, pv_phase="Available")
    assert len(kube.touched) == 1  # only the first update, right after the volume

    rec.claim_recheck_s = 2.0  # the bind below comes well before the first look
    world.instance("b", "NVIDIA-A100-SXM4-80GB")
    kube.pv_phase = "Bound"
    rec.reconcile_named(NS, "b")
    claim = copy.deepcopy(world.kube.pvcs[(NS, b.pvc_name("b"))])
    kube.bound.add(b.pvc_name("b"))
    rec.claim_changed(claim | {"status": {"phase": "Bound"}}, deleted=False)
    wait_for(lambda: rec._later.ran == 7)
    assert kube.looks == 6 and len(kube.touched) == 2  # bound before the first look


def test_later_runs_calls_in_due_order_past_a_failing_one() -> None:
    later = Later()
    order: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    later.call(0.6, lambda: order.append("c"))
    later.call(0.2, fail)
    later.call(0.0, lambda: order.append("a"))
    later.call(0.4, lambda: order.append("b"))
    wait_for(lambda: later.ran == 4)
    assert order == ["a", "b", "c"]


def test_the_accrual_estimate_is_computed_once_per_account_and_second(
    world: World, monkeypatch: Any
) -> None:
    """It walks every unsettled meter of the account; a burst of starts asks for the same
    second's figure. A new second (or a second of real time) computes it again."""
    world.fund(10**9)
    asked: list[object] = []
    real = world.ledger.unposted_by_resource

    def counted(account: str, now: Any) -> Any:
        asked.append(now)
        return real(account, now)

    monkeypatch.setattr(world.ledger, "unposted_by_resource", counted)
    world.rec.accrual_reuse_s = 600.0  # however slow the machine, the second is the key
    for name in ("a", "b", "c"):
        world.instance(name, "NVIDIA-A100-SXM4-80GB")
        world.rec.reconcile_named(NS, name)
    assert len(asked) == 1
    world.clock.advance(1)
    world.instance("d", "NVIDIA-A100-SXM4-80GB")
    world.rec.reconcile_named(NS, "d")
    assert len(asked) == 2
    assert all(world.status(n)["phase"] == "Pending" for n in "abc")
