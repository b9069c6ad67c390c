from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime
from typing import Any

from gpucloud_operator import builders as b
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.kube import Kube
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
        self.reads = 0
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "patch_status":
                time.sleep(0.01)
            with self._lock:
                if name == "get_namespaced_object":
                    self.reads += 1
                return attr(*args, **kwargs)

        return call if callable(attr) else attr

    def pvc_bound(self, namespace: str, name: str) -> bool:
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


def test_cached_loads_once_for_concurrent_callers() -> None:
    kube = Kube.__new__(Kube)  # only the cache: no cluster needed
    kube._cache, kube._cache_lock, kube._loading = {}, threading.Lock(), {}
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
