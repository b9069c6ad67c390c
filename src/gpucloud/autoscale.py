"""The model autoscaling rule: pure, no I/O, ``now`` passed in.

The operator calls :func:`decide` about every ``windowSeconds`` (the gateway wakes a cold
model on its own, by asking for one replica; the next pass sees the wake). The rule:

* **Load**: ``ceil(requests in the last window / targetRequestsPerReplica)`` replicas,
  at least one while the model is warm, clamped to ``[minReplicas, maxReplicas]``.
* **Scale up** at once, to the load (never above max).
* **Scale down** gradually: at most ``max_step_down`` replicas, and only when the last
  scale-down is at least one window old. Never below the number of replicas that have
  requests in flight; the replicas to remove are named (``victims``), idle ones only.
* **Cold**: a model with ``minReplicas == 0`` and ``cold_start`` on, idle for
  ``coldAfterSeconds`` (no request, nothing in flight, nothing queued), goes to zero.
  Idle time counts from the later of the last request and the moment the model last
  became ready: a replica still *pending* (waiting for GPU capacity) or starting is never
  idle, so a model that is still coming up can never be sent cold for "having served
  nothing" (a known failure of request-driven scalers).
* **Wake**: a request queued at a model with no replicas asks for ``max(1, min)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class AutoscaleError(ValueError):
    """Bad input to the autoscaler, naming the field and the rule."""


class Action(StrEnum):
    HOLD = "hold"
    UP = "up"
    DOWN = "down"
    COLD = "cold"
    WAKE = "wake"


class ModelState(StrEnum):
    """The ``status.state`` values of a ModelDeployment."""

    COLD = "Cold"
    STARTING = "Starting"
    SERVING = "Serving"
    SCALING = "Scaling"


def _int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AutoscaleError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise AutoscaleError(f"{name} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class ScalingPolicy:
    """What a ModelDeployment's spec says about scaling."""

    min_replicas: int = 0
    max_replicas: int = 1
    target_requests_per_replica: int = 600
    window_seconds: int = 600
    cold_after_seconds: int = 600
    cold_start: bool = True  # may go to zero when idle (requires min_replicas == 0)
    max_step_down: int = 1  # replicas removed per window at most

    def __post_init__(self) -> None:
        _int(self.min_replicas, "minReplicas", 0)
        _int(self.max_replicas, "maxReplicas", 1)
        if self.min_replicas > self.max_replicas:
            raise AutoscaleError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas "
                f"({self.max_replicas})"
            )
        _int(self.target_requests_per_replica, "scaling.targetRequestsPerReplica", 1)
        _int(self.window_seconds, "scaling.windowSeconds", 1)
        _int(self.cold_after_seconds, "scaling.coldAfterSeconds", 1)
        _int(self.max_step_down, "max_step_down", 1)

    @property
    def can_go_cold(self) -> bool:
        return self.cold_start and self.min_replicas == 0

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], max_step_down: int = 1, cold_after_seconds: int = 600
    ) -> ScalingPolicy:
        """From a ModelDeployment ``spec`` (CRD defaults applied where fields are absent;
        ``cold_after_seconds`` is the installation's default idle time before going cold).
        Any model with ``minReplicas: 0`` may go cold: the CRD reads "0 lets the model go
        cold"; for public models that only frees GPUs (they are billed per use)."""
        scaling = spec.get("scaling") or {}
        return cls(
            min_replicas=spec.get("minReplicas", 0),
            max_replicas=spec.get("maxReplicas", 1),
            target_requests_per_replica=scaling.get("targetRequestsPerReplica", 600),
            window_seconds=scaling.get("windowSeconds", 600),
            cold_after_seconds=scaling.get("coldAfterSeconds", cold_after_seconds),
            max_step_down=max_step_down,
        )


@dataclass(frozen=True)
class Replica:
    """One replica (pod) as the scaler sees it."""

    name: str
    ready: bool = True  # serving (readiness passed)
    pending: bool = False  # not yet scheduled: waiting for GPU capacity
    in_flight: int = 0  # requests being served right now (from the gateway)

    def __post_init__(self) -> None:
        _int(self.in_flight, f"replica {self.name!r} in_flight", 0)
        if self.pending and self.ready:
            raise AutoscaleError(f"replica {self.name!r}: a pending pod cannot be ready")


@dataclass(frozen=True)
class Observation:
    """What the scaler knows at ``now``."""

    replicas: Sequence[Replica]  # the pods that exist now
    desired: int  # the Deployment's spec.replicas now
    requests_last_window: int  # requests that reached the gateway in the last window
    last_request_at: datetime | None = None
    ready_since: datetime | None = None  # when the model last went from 0 to >=1 ready
    last_scale_down_at: datetime | None = None
    queued: int = 0  # requests waiting at the gateway for a replica

    def __post_init__(self) -> None:
        _int(self.desired, "desired", 0)
        _int(self.requests_last_window, "requests_last_window", 0)
        _int(self.queued, "queued", 0)
        for name, when in (
            ("last_request_at", self.last_request_at),
            ("ready_since", self.ready_since),
            ("last_scale_down_at", self.last_scale_down_at),
        ):
            if when is not None and when.tzinfo is None:
                raise AutoscaleError(f"{name} must be timezone-aware, got {when!r}")

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def busy(self) -> int:
        return sum(1 for r in self.replicas if r.in_flight > 0)

    @property
    def coming_up(self) -> int:
        """Replicas pending on GPU capacity or starting: never idle."""
        return sum(1 for r in self.replicas if r.pending or not r.ready)


@dataclass(frozen=True)
class Decision:
    """What to do: set the Deployment's replicas to ``desired``; if scaling down, remove
    ``victims`` (the operator gives them the lowest pod-deletion-cost)."""

    desired: int
    current: int
    action: Action
    reason: str
    state: ModelState
    victims: tuple[str, ...] = field(default=())
    idle_seconds: float | None = None  # how long the model has been idle, when warm


def load_replicas(policy: ScalingPolicy, requests_last_window: int) -> int:
    """Replicas the last window's request volume calls for (at least 1), within bounds."""
    need = max(1, math.ceil(requests_last_window / policy.target_requests_per_replica))
    return max(policy.min_replicas, min(policy.max_replicas, need))


def idle_seconds(obs: Observation, now: datetime) -> float | None:
    """Seconds the model has been idle, or None when it is not idle at all (requests in
    flight or queued, a replica pending or starting, or no replica ready yet)."""
    if obs.in_flight or obs.queued or obs.coming_up or not obs.replicas:
        return None
    marks = [t for t in (obs.last_request_at, obs.ready_since) if t is not None]
    if not marks:
        return None  # ready but never timed: not provably idle
    return max(0.0, (now - max(marks)).total_seconds())


def _state(desired: int, obs: Observation) -> ModelState:
    ready = sum(1 for r in obs.replicas if r.ready)
    if desired == 0:
        return ModelState.COLD
    if ready == 0:
        return ModelState.STARTING
    if desired != len(obs.replicas) or ready != desired:
        return ModelState.SCALING
    return ModelState.SERVING


def _victims(obs: Observation, count: int) -> tuple[str, ...]:
    """Replicas safe to remove, ``count`` at most: never one with requests in flight.
    Pending pods first (they hold no GPU), then starting ones, then ready ones."""
    idle = [r for r in obs.replicas if r.in_flight == 0]
    idle.sort(key=lambda r: (not r.pending, r.ready, r.name))
    return tuple(r.name for r in idle[:count])


def hold(obs: Observation, reason: str) -> Decision:
    """Keep the replicas as they are (the state named as :func:`decide` would name it)."""
    return Decision(obs.desired, obs.desired, Action.HOLD, reason, _state(obs.desired, obs))


def decide(policy: ScalingPolicy, obs: Observation, now: datetime) -> Decision:
    """The scaling decision at ``now``; see the module docstring for the rule."""
    if now.tzinfo is None:
        raise AutoscaleError(f"now must be timezone-aware, got {now!r}")
    current = obs.desired

    def done(desired: int, action: Action, reason: str, victims: tuple[str, ...] = ()) -> Decision:
        return Decision(
            desired, current, action, reason, _state(desired, obs), victims, idle_seconds(obs, now)
        )

    if current == 0:
        if obs.queued or obs.in_flight:
            target = max(1, policy.min_replicas, load_replicas(policy, obs.requests_last_window))
            return done(target, Action.WAKE, f"{obs.queued} request(s) waiting at a cold model")
        if policy.min_replicas > 0:
            return done(policy.min_replicas, Action.UP, f"below minReplicas {policy.min_replicas}")
        return done(0, Action.HOLD, "cold, no requests")

    idle = idle_seconds(obs, now)
    if policy.can_go_cold and idle is not None and idle >= policy.cold_after_seconds:
        return done(
            0,
            Action.COLD,
            f"idle for {idle:.0f}s >= coldAfterSeconds {policy.cold_after_seconds}",
            tuple(r.name for r in obs.replicas),
        )

    want = load_replicas(policy, obs.requests_last_window)
    if want > current:
        return done(
            want,
            Action.UP,
            f"{obs.requests_last_window} requests in the last window need {want} replica(s) "
            f"at {policy.target_requests_per_replica} per replica",
        )
    if current > policy.max_replicas:  # max lowered by the user: obey, still gently
        want = policy.max_replicas
    if want == current:
        return done(current, Action.HOLD, f"load matches {current} replica(s)")

    window = timedelta(seconds=policy.window_seconds)
    if obs.last_scale_down_at is not None and now - obs.last_scale_down_at < window:
        return done(current, Action.HOLD, "scaled down less than one window ago")
    floor = max(want, current - policy.max_step_down, obs.busy, policy.min_replicas, 1)
    if floor >= current:
        return done(current, Action.HOLD, f"{obs.busy} replica(s) have requests in flight")
    # Removing replicas that do not exist yet (desired > pods) needs no victim.
    missing = max(0, current - len(obs.replicas))
    victims = _victims(obs, max(0, current - floor - missing))
    desired = current - min(current - floor, missing + len(victims))
    if desired == current:
        return done(current, Action.HOLD, "every replica has requests in flight")
    return done(
        desired,
        Action.DOWN,
        f"{obs.requests_last_window} requests in the last window need {want} replica(s); "
        f"stepping down by {current - desired}",
        victims,
    )
