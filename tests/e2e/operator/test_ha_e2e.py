"""Two operator replicas with Kopf peering; the active one is SIGKILLed in the middle of
a burst of starts: the standby takes over within the goal (10 s), finishes the burst,
and every run is billed once, from its pod's start to its stop."""

from __future__ import annotations

from pathlib import Path

import failover
import pytest

from gpucloud.testing.testbed import Testbed

pytestmark = pytest.mark.e2e


def test_the_standby_takes_over_mid_burst_and_bills_every_run_once(
    testbed: Testbed, namespace: str, tmp_path: Path
) -> None:
    result = failover.run(testbed, namespace, tmp_path, burst=6)
    print(f"operator_failover_s: {result.failover_s:.1f} s (late: {result.late_s:.1f} s)")
    assert result.running_before_kill < 7  # killed mid-burst
    assert result.failover_s <= 10 and result.late_s <= 10
    assert not result.problems, "\n".join(result.problems)
