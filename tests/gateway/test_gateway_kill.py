"""``kill -9`` of the gateway during a burst, with the ledger slowed down: every request
whose caller got its answer is billed exactly once (see ``kill_burst``).

``GPUCLOUD_KILL_REQUESTS`` (default 600) sizes the burst; the issue's runs used 2,000-3,000.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kill_burst import run_burst

REQUESTS = int(os.environ.get("GPUCLOUD_KILL_REQUESTS", "600"))


@pytest.mark.slow
def test_kill_9_during_a_burst_with_a_slow_ledger_bills_every_answer_once(
    tmp_path: Path,
) -> None:
    out = run_burst(tmp_path, requests=REQUESTS, kills=3)
    assert len(out.answered) == REQUESTS
    assert out.unbilled == [], f"{len(out.unbilled)} answered requests were never billed"
    assert out.doubled == []
    assert out.mismatches == []
    # The test bit: the last kill left queued records the ledger had not taken yet, and
    # the restarted gateway recorded them with no request to start it.
    assert out.left_unposted > 0
    # A recorded request the kill cut before its caller had it may be billed (the
    # caller retried it under a new id): at most the requests in flight at each kill.
    assert out.billed_unanswered <= 24 * out.kills
    # Scaling does not forget: the restarted gateway counts every stored request.
    for model in ("team/text", "team/personal"):
        stored = sum(1 for r in out.rows.values() if r["model"] == model)
        assert out.stats[model]["requestsLastWindow"] == stored
        assert out.stats[model]["requestsTotal"] == stored
        assert out.stats[model]["lastRequestAt"] is not None
