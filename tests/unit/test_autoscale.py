"""The autoscaling rule: scenarios on an injected clock, and invariants by hypothesis."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucloud.autoscale import (
    Action,
    AutoscaleError,
    Decision,
    ModelState,
    Observation,
    Replica,
    ScalingPolicy,
    decide,
    hold,
)
from gpucloud.clock import ManualClock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def replicas(n: int, **kw: object) -> list[Replica]:
    return [Replica(f"r{i}", **kw) for i in range(n)]  # type: ignore[arg-type]


class Model:
    """A model driven through the scaler every window, as the operator would."""

    def __init__(self, policy: ScalingPolicy, clock: ManualClock, start: int) -> None:
        self.policy, self.clock = policy, clock
        self.desired = start
        self.ready_since: datetime | None = clock.now() if start else None
        self.last_request_at: datetime | None = None
        self.last_down: datetime | None = None

    def tick(self, requests: int, in_flight: tuple[int, ...] = ()) -> Decision:
        if requests:
            self.last_request_at = self.clock.now() - timedelta(seconds=1)
        flights = list(in_flight) + [0] * max(0, self.desired - len(in_flight))
        reps = [Replica(f"r{i}", in_flight=flights[i]) for i in range(self.desired)]
        obs = Observation(
            replicas=reps,
            desired=self.desired,
            requests_last_window=requests,
            last_request_at=self.last_request_at,
            ready_since=self.ready_since,
            last_scale_down_at=self.last_down,
        )
        d = decide(self.policy, obs, self.clock.now())
        if d.desired < self.desired:
            self.last_down = self.clock.now()
        if self.desired == 0 and d.desired > 0:
            self.ready_since = self.clock.now()
        self.desired = d.desired
        self.clock.advance(self.policy.window_seconds)
        return d


def test_scale_up_under_load_then_down_one_step_per_quiet_window() -> None:
    clock = ManualClock(T0)
    m = Model(ScalingPolicy(1, 5, target_requests_per_replica=100), clock, 1)
    d = m.tick(350)
    assert (d.action, d.desired) == (Action.UP, 4)
    assert "350 requests" in d.reason
    assert m.tick(10_000).desired == 5  # capped at max
    downs = [m.tick(0).desired for _ in range(6)]
    assert downs == [4, 3, 2, 1, 1, 1]  # one step per window, never below min


def test_respects_min_and_max() -> None:
    clock = ManualClock(T0)
    m = Model(ScalingPolicy(2, 3, target_requests_per_replica=10), clock, 0)
    d = m.tick(0)
    assert (d.action, d.desired) == (Action.UP, 2)
    assert m.tick(1000).desired == 3
    for _ in range(5):
        assert m.tick(0).desired >= 2


def test_private_model_goes_cold_after_ten_idle_minutes_and_wakes_on_a_request() -> None:
    clock = ManualClock(T0)
    policy = ScalingPolicy.from_spec({"minReplicas": 0, "maxReplicas": 2})
    assert (policy.window_seconds, policy.cold_after_seconds) == (600, 600)
    ready = T0
    last = T0 + timedelta(minutes=1)
    obs = Observation(replicas(1), 1, 3, last_request_at=last, ready_since=ready)
    at_9 = decide(policy, obs, last + timedelta(minutes=9, seconds=59))
    assert at_9.action is Action.HOLD and at_9.desired == 1
    at_10 = decide(policy, obs, last + timedelta(minutes=10))
    assert (at_10.action, at_10.desired, at_10.state) == (Action.COLD, 0, ModelState.COLD)
    assert at_10.victims == ("r0",)
    cold = Observation([], 0, 0, last_request_at=last)
    assert decide(policy, cold, clock.now() + timedelta(hours=5)).action is Action.HOLD
    woken = decide(policy, Observation([], 0, 1, queued=4), clock.now())
    assert (woken.action, woken.desired, woken.state) == (Action.WAKE, 1, ModelState.STARTING)


def test_min_one_never_goes_cold() -> None:
    policy = ScalingPolicy(1, 2)
    obs = Observation(replicas(1), 1, 0, last_request_at=T0, ready_since=T0)
    assert decide(policy, obs, T0 + timedelta(days=1)).desired == 1


def test_pending_pods_are_never_idle() -> None:
    """A model woken by a request whose pod waits for GPU capacity for an hour must not be
    sent cold for having served nothing: it is starting, not idle."""
    policy = ScalingPolicy(0, 2)
    obs = Observation(
        [Replica("r0", ready=False, pending=True)], 1, 1, last_request_at=T0, ready_since=None
    )
    d = decide(policy, obs, T0 + timedelta(hours=1))
    assert d.action is Action.HOLD and d.desired == 1 and d.idle_seconds is None
    assert d.state is ModelState.STARTING
    # Idle time runs from when the model became ready, not from the last request.
    ready_late = Observation(
        replicas(1), 1, 0, last_request_at=T0, ready_since=T0 + timedelta(hours=1)
    )
    assert decide(policy, ready_late, T0 + timedelta(hours=1, minutes=5)).desired == 1
    assert decide(policy, ready_late, T0 + timedelta(hours=1, minutes=10)).desired == 0


def test_scale_down_never_drops_a_replica_with_requests_in_flight() -> None:
    policy = ScalingPolicy(0, 4, target_requests_per_replica=10, max_step_down=3)
    reps = [Replica("a", in_flight=2), Replica("b"), Replica("c", in_flight=1), Replica("d")]
    d = decide(policy, Observation(reps, 4, 0, last_request_at=T0, ready_since=T0), T0)
    assert d.action is Action.DOWN and d.desired == 2
    assert set(d.victims) == {"b", "d"}
    busy = [Replica(n, in_flight=1) for n in "abcd"]
    held = decide(policy, Observation(busy, 4, 0, last_request_at=T0, ready_since=T0), T0)
    assert (held.action, held.desired, held.victims) == (Action.HOLD, 4, ())


def test_bad_input_names_the_field() -> None:
    with pytest.raises(AutoscaleError, match=r"minReplicas \(3\) must not exceed maxReplicas"):
        ScalingPolicy(3, 2)
    with pytest.raises(AutoscaleError, match=r"scaling\.targetRequestsPerReplica must be >= 1"):
        ScalingPolicy(0, 1, target_requests_per_replica=0)
    with pytest.raises(AutoscaleError, match="requests_last_window must be an int"):
        Observation([], 0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(AutoscaleError, match="now must be timezone-aware"):
        decide(ScalingPolicy(), Observation([], 0, 0), datetime(2026, 1, 1))


def test_the_installation_default_cold_time_applies_only_where_the_spec_sets_none() -> None:
    assert ScalingPolicy.from_spec({}, cold_after_seconds=120).cold_after_seconds == 120
    spec = {"scaling": {"coldAfterSeconds": 900}}
    assert ScalingPolicy.from_spec(spec, cold_after_seconds=120).cold_after_seconds == 900
    assert ScalingPolicy.from_spec({}).cold_after_seconds == 600


# -- invariants ---------------------------------------------------------------------------

policies = st.builds(
    lambda lo, span, target, window, cold, step: ScalingPolicy(
        lo, max(1, lo + span), target, window, cold, max_step_down=step
    ),
    st.integers(0, 5),
    st.integers(0, 6),
    st.integers(1, 500),
    st.integers(60, 1200),
    st.integers(60, 1200),
    st.integers(1, 3),
)
replica_st = st.builds(
    lambda pending, ready, flight: Replica(
        "x", ready=ready and not pending, pending=pending, in_flight=flight
    ),
    st.booleans(),
    st.booleans(),
    st.integers(0, 3),
)


@st.composite
def observations(draw: st.DrawFn) -> tuple[ScalingPolicy, Observation, datetime]:
    policy = draw(policies)
    reps = draw(st.lists(replica_st, max_size=8))
    reps = [Replica(f"r{i}", r.ready, r.pending, r.in_flight) for i, r in enumerate(reps)]
    desired = draw(st.integers(len(reps), len(reps) + 2)) if reps else draw(st.integers(0, 2))
    offset = st.none() | st.integers(0, 3600).map(lambda s: T0 - timedelta(seconds=s))
    obs = Observation(
        reps,
        desired,
        draw(st.integers(0, 5000)),
        last_request_at=draw(offset),
        ready_since=draw(offset),
        last_scale_down_at=draw(offset),
        queued=draw(st.integers(0, 3)),
    )
    return policy, obs, T0


@settings(max_examples=300, deadline=None)
@given(observations())
def test_invariants(case: tuple[ScalingPolicy, Observation, datetime]) -> None:
    policy, obs, now = case
    d = decide(policy, obs, now)
    assert d.current == obs.desired
    # Within bounds, or zero only by going (or staying) cold.
    if d.desired == 0:
        assert policy.min_replicas == 0 and d.action in (Action.COLD, Action.HOLD)
        assert obs.desired == 0 or policy.can_go_cold
    else:
        assert policy.min_replicas <= d.desired <= max(policy.max_replicas, obs.desired)
    # Never fewer replicas than have requests in flight; victims are idle, existing pods.
    if obs.in_flight or obs.queued:
        assert d.desired >= max(1, obs.busy)
    names = {r.name: r for r in obs.replicas}
    assert all(names[v].in_flight == 0 for v in d.victims)
    assert len(set(d.victims)) == len(d.victims)
    # Going cold needs true idleness: nothing pending, starting, in flight or queued.
    if d.action is Action.COLD:
        assert not obs.coming_up and not obs.in_flight and not obs.queued
        assert d.idle_seconds is not None and d.idle_seconds >= policy.cold_after_seconds
    # Gradual scale-down: one step per window at most.
    if d.action is Action.DOWN:
        assert obs.desired - d.desired <= policy.max_step_down
        last = obs.last_scale_down_at
        assert last is None or (now - last).total_seconds() >= policy.window_seconds
        assert len(d.victims) <= obs.desired - d.desired
    # Scale-up goes to the load at once (capped at max).
    need = min(
        policy.max_replicas,
        max(1, math.ceil(obs.requests_last_window / policy.target_requests_per_replica)),
    )
    if d.action in (Action.UP, Action.WAKE):
        assert d.desired >= min(need, policy.max_replicas) or d.desired == policy.min_replicas
    if obs.desired > 0 and d.action is not Action.COLD:
        assert d.desired >= min(need, obs.desired)
    # A hold names the state as the decision would, at the same replicas.
    if d.desired == obs.desired:
        kept = hold(obs, "held")
        assert (kept.desired, kept.action, kept.state) == (obs.desired, Action.HOLD, d.state)
