"""Idle-GPU detection (docs/idle.md), pure: from a run's usage records with their
activity, since when its GPUs have been idle, and what the Account's policy asks for.

A second is idle evidence only when an agent sampled it and saw the GPU at most
``utilizationPercent`` busy (and, if the policy sets ``memoryMiB``, holding at most that
much memory). Everything else breaks an idle stretch:
- a busier sample (the GPU worked);
- a window the agent sent without activity, or with fewer than half its seconds
  sampled (an old agent, a gap bridged after a restart): no evidence is not idleness;
- a gap between two records of a GPU (the agent was down, or the record is late);
- the start of the run plus the policy's grace (images load, data is staged).
An instance is idle since the latest of those breaks over all its GPUs, and only for
as long as every GPU has reports: when the reports stop, the idle time stops growing.
It is called idle once that lasts ``idleAfterMinutes`` (a data loader at 0% for five
minutes is not idle), noticed after ``notifyAfterMinutes``, stopped (opt-in) after
``stopAfterMinutes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpucloud.crd.account import IdlePolicy
from gpucloud.ledger import GpuActivity

MIB = 2**20


@dataclass(frozen=True)
class IdleView:
    since: int  # POSIX seconds: the end of the last break
    seen_until: int  # the earliest of the GPUs' last reported second (exclusive)

    @property
    def seconds(self) -> int:
        return max(0, self.seen_until - self.since)


def is_idle_evidence(a: GpuActivity, policy: IdlePolicy) -> bool:
    if a.util_max_percent is None or a.memory_max_bytes is None or not a.samples:
        return False
    if 2 * a.samples < a.end - a.start:
        return False  # mostly bridged, not sampled
    if a.util_max_percent > policy.utilization_percent:
        return False
    return policy.memory_mib is None or a.memory_max_bytes <= policy.memory_mib * MIB


def idle_view(
    records: Iterable[GpuActivity], gpus: int, known_from: int, policy: IdlePolicy
) -> IdleView | None:
    """Since when the run's ``gpus`` GPUs have all been idle, judged from ``known_from``
    (the end of the start's grace, or how far back the caller looked) on, from its
    records (any order); None while not every GPU has reported after it."""
    since = known_from
    by_gpu: dict[str, list[GpuActivity]] = {}
    for a in records:
        if a.end > known_from:
            by_gpu.setdefault(a.gpu, []).append(a)
    if len(by_gpu) < gpus:
        return None
    seen_until = None
    for rows in by_gpu.values():
        rows.sort(key=lambda a: a.start)
        last_end = known_from
        for a in rows:
            if a.start > last_end:
                since = max(since, a.start)  # a gap: nothing is known before this record
            if not is_idle_evidence(a, policy):
                since = max(since, a.end)
            last_end = max(last_end, a.end)
        seen_until = last_end if seen_until is None else min(seen_until, last_end)
    assert seen_until is not None
    if seen_until <= since:
        return None
    return IdleView(since, seen_until)


@dataclass(frozen=True)
class IdleVerdict:
    idle: bool  # idle for at least idleAfterMinutes
    notify: bool  # ... and for notifyAfterMinutes
    stop: bool  # ... and for stopAfterMinutes (when set)


def verdict(view: IdleView | None, policy: IdlePolicy) -> IdleVerdict:
    seconds = view.seconds if view is not None else 0
    stop_after = policy.stop_after_minutes
    return IdleVerdict(
        idle=seconds >= policy.idle_after_minutes * 60,
        notify=seconds >= policy.notify_after_minutes * 60,
        stop=stop_after is not None and seconds >= stop_after * 60,
    )
