from __future__ import annotations

from datetime import UTC, datetime

from gpucloud_operator.placement import (
    NodeGPUs,
    PodGPUs,
    choose_node,
    fallback_node,
    plan_preemption,
)

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
