"""Pure placement arithmetic: free GPUs per node, where to pin a new instance, and which
spot instances to preempt. Quantities are integers; nothing here calls the API."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class NodeGPUs:
    name: str
    product: str | None
    allocatable: int
    schedulable: bool = True


@dataclass(frozen=True)
class PodGPUs:
    """A pod holding (or bound to hold) GPUs on a node."""

    namespace: str
    instance: str  # the GPUInstance name ("" for pods that are not instances)
    node: str
    gpus: int
    spot: bool
    started_at: datetime | None  # when its run started (youngest are preempted first)
    preempting: bool = False  # already given notice: its GPUs are as good as free


@dataclass(frozen=True)
class Preemption:
    node: str
    victims: tuple[PodGPUs, ...]


def used_gpus(pods: Iterable[PodGPUs]) -> dict[str, int]:
    used: dict[str, int] = {}
    for pod in pods:
        used[pod.node] = used.get(pod.node, 0) + pod.gpus
    return used


def free_gpus(nodes: Iterable[NodeGPUs], pods: Iterable[PodGPUs]) -> dict[str, int]:
    used = used_gpus(pods)
    return {n.name: n.allocatable - used.get(n.name, 0) for n in nodes}


def _candidates(nodes: Iterable[NodeGPUs], product: str, count: int) -> list[NodeGPUs]:
    return [n for n in nodes if n.product == product and n.schedulable and n.allocatable >= count]


def choose_node(nodes: list[NodeGPUs], pods: list[PodGPUs], product: str, count: int) -> str | None:
    """Best fit: the node of ``product`` with enough free GPUs that leaves the fewest free
    (keeps big holes for big instances); ties by name. None when no node has room now."""
    free = free_gpus(nodes, pods)
    fits = [n for n in _candidates(nodes, product, count) if free[n.name] >= count]
    if not fits:
        return None
    return min(fits, key=lambda n: (free[n.name] - count, n.name)).name


def fallback_node(nodes: list[NodeGPUs], product: str, count: int) -> str | None:
    """Where to pin an instance that fits nowhere right now: the largest node of its
    product that could hold it at all (None: no node ever can; the scheduler says why)."""
    fits = _candidates(nodes, product, count)
    if not fits:
        return None
    return max(fits, key=lambda n: (n.allocatable, n.name)).name


def largest_node(nodes: list[NodeGPUs], product: str) -> str | None:
    same = [n for n in nodes if n.product == product]
    return max(same, key=lambda n: (n.allocatable, n.name)).name if same else None


def plan_preemption(
    nodes: list[NodeGPUs],
    pods: list[PodGPUs],
    product: str,
    count: int,
    only_node: str | None = None,
) -> Preemption | None:
    """Spot instances to stop so that ``count`` GPUs of ``product`` come free on one node:
    the node needing the fewest victims, taking the youngest spot runs first. Pods already
    given notice count as free and are not picked again. Non-spot pods are never victims.
    None when no node can be freed enough (or enough is already free / being freed)."""
    best: Preemption | None = None
    for node in _candidates(nodes, product, count):
        if only_node is not None and node.name != only_node:
            continue
        on_node = [p for p in pods if p.node == node.name]
        free = node.allocatable - sum(p.gpus for p in on_node if not p.preempting)
        if free >= count:
            return None  # room is there (or is being made): nothing more to preempt
        spot = sorted(
            (p for p in on_node if p.spot and not p.preempting),
            # youngest first; a run that never started counts as the youngest
            key=lambda p: p.started_at.timestamp() if p.started_at else float("inf"),
            reverse=True,
        )
        victims: list[PodGPUs] = []
        for pod in spot:
            if free >= count:
                break
            victims.append(pod)
            free += pod.gpus
        if free < count:
            continue
        if best is None or (len(victims), node.name) < (len(best.victims), best.node):
            best = Preemption(node.name, tuple(victims))
    return best
