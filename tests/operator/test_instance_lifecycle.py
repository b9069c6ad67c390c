"""The run lifecycle's table (gpucloud_operator.instances.lifecycle.next_step): what a
pass does for each phase and spec.state, once the billing rules of the pass are done."""

from __future__ import annotations

import pytest
from gpucloud_operator import rules as r
from gpucloud_operator.instances.lifecycle import Step, next_step

PHASES = [
    None, "Pending", "Starting", "Running", "Stopped", "Expired", "Preempted", "Queued", "Refused",
]  # fmt: skip


@pytest.mark.parametrize(
    ("phase", "desired", "halted", "step"),
    [
        (None, "Running", False, Step.START),  # a new instance
        ("Pending", "Running", False, Step.OBSERVE_START),
        ("Starting", "Running", True, Step.OBSERVE_START),
        ("Running", "Running", False, Step.OBSERVE_RUNNING),
        ("Stopped", "Running", False, Step.START),  # the user started it again
        ("Stopped", "Running", True, Step.STAY_DOWN),  # stopped by arrears, spec unchanged
        ("Expired", "Running", True, Step.STAY_DOWN),
        ("Expired", "Running", False, Step.START),  # the spec changed: start again
        ("Preempted", "Running", True, Step.STAY_DOWN),
        ("Refused", "Running", True, Step.START),  # a refusal is retried
        ("Queued", "Running", False, Step.RESUME),  # preempted, spec.spot.resume: its turn?
        ("Queued", "Running", True, Step.RESUME),
        ("Queued", "Stopped", False, Step.MARK_STOPPED),  # taken off the queue
        ("Running", "Stopped", False, Step.STOP),
        ("Pending", "Stopped", False, Step.STOP),  # admitted, pod maybe created: stop it
        (None, "Stopped", False, Step.MARK_STOPPED),
        ("Refused", "Stopped", False, Step.MARK_STOPPED),
        ("Stopped", "Stopped", False, Step.NOTHING),
        ("Expired", "Stopped", False, Step.NOTHING),  # keeps the reason it went down
        ("Preempted", "Stopped", True, Step.NOTHING),
    ],
)
def test_next_step(phase: str | None, desired: str, halted: bool, step: Step) -> None:
    assert next_step(phase, desired, halted) is step


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("halted", [False, True])
def test_spec_state_stopped_never_starts_and_running_never_stops(
    phase: str | None, halted: bool
) -> None:
    stopped = next_step(phase, "Stopped", halted)
    assert stopped in (Step.STOP, Step.MARK_STOPPED, Step.NOTHING)
    assert (stopped is Step.STOP) == (phase in r.ACTIVE_PHASES)  # GPUs are never kept
    running = next_step(phase, "Running", halted)
    assert running not in (Step.STOP, Step.MARK_STOPPED, Step.NOTHING)
