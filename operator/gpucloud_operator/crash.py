"""Crash points: where the tests kill the operator on purpose (docs/operator.md, "Crash
windows"). ``GPUCLOUD_OPERATOR_CRASH_AT=<point>[,<point>...]`` makes the process SIGKILL
itself the first time it reaches one of those points: no cleanup, no final patch, exactly
as ``kill -9`` at that instant. Unset (always, outside tests), a crash point is a set
lookup."""

from __future__ import annotations

import os
import signal
import sys

# Every crash point, in the order a run meets them (the tests and the docs list these).
POINTS = (
    "anchor-saved",  # podCreatedAt saved, pod not created
    "pod-created",  # pod created, nothing of the run billed yet
    "billing-saved",  # meterId/meterSince/startedAt saved, ledger meter not opened
    "term-charged",  # package term posted to the ledger, not in status yet
    "notice-given",  # spot instance's preemptAt saved, nothing stopped yet
    "stop-saved",  # Stopping + stoppedAt saved, pod not deleted
    "meter-closed",  # ledger meter closed, status still names it as open
    "settled",  # run settled in the ledger, status still lists it unsettled
)

_ARMED = frozenset(
    p for p in os.environ.get("GPUCLOUD_OPERATOR_CRASH_AT", "").split(",") if p.strip()
)


def crash_point(name: str) -> None:
    """SIGKILL this process here if the tests asked for it."""
    if name in _ARMED:
        print(f"crash point {name}: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
