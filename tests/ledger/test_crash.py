"""A worker process that ingests and rates in a loop is SIGKILLed at random moments and
restarted; in the end exactly the expected GPU-seconds are charged, once."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest
from ledger_helpers import CRASH_GPUS, CRASH_PRICE, crash_worker, worker_context

from gpucloud.billing.money import to_minor
from gpucloud.ledger import Ledger

WINDOWS, BATCH, KILLS = 200, 10, 6
STEPS = 2 * WINDOWS // BATCH  # progress ticks of one complete run


def _wait_for(progress, target: int, proc, timeout: float = 60) -> bool:  # type: ignore[no-untyped-def]
    """Wait until the worker has counted ``target`` steps (True) or exited (False)."""
    deadline = time.monotonic() + timeout
    while progress.value < target:
        if not proc.is_alive():
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"worker stuck at step {progress.value} of {target}")
        time.sleep(0.002)
    return True


@pytest.mark.slow
def test_sigkill_during_ingest_and_rating_loses_and_doubles_nothing(
    ledger_url: str, ledger: Ledger
) -> None:
    ctx = worker_context()
    rng = random.Random(20260101)
    killed_mid_run = 0
    for _ in range(KILLS):
        progress = ctx.Value("i", 0, lock=False)  # no lock: a killed worker cannot hold one
        proc = ctx.Process(target=crash_worker, args=(ledger_url, WINDOWS, BATCH, progress))
        proc.start()
        if _wait_for(progress, rng.randint(1, STEPS), proc):
            time.sleep(rng.uniform(0, 0.02))  # land anywhere inside the step under way
            proc.kill()  # SIGKILL
        proc.join(30)
        killed_mid_run += proc.exitcode == -9
    final = ctx.Process(target=crash_worker, args=(ledger_url, WINDOWS, BATCH))
    final.start()
    final.join(120)
    assert final.exitcode == 0
    assert killed_mid_run >= KILLS // 2  # the kills really interrupted work

    seconds = WINDOWS * 10 * len(CRASH_GPUS)
    expected = -to_minor(Fraction(seconds) * Fraction(CRASH_PRICE) / 3600)
    assert ledger.get_meter("m").quantity_rated == seconds
    assert ledger.balance("acct") == ledger.entries_sum("acct") == expected
    keys = [e.key for e in ledger.entries("acct", limit=10_000)]
    assert keys == [f"meter:m:{n}" for n in range(1, len(keys) + 1)]
    assert ledger.unrated_usage() == []
