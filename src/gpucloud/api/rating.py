"""The background rating loop: turns ingested usage into charges within seconds.

Woken by every ingestion (and at least every ``interval_s`` for running meters and
order expiry), it calls ``ledger.rate_pending(now)`` in a worker thread. The lag from
each ingestion to the end of the pass that covered it feeds a histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from anyio import to_thread

from gpucloud.api.gate import FairLock
from gpucloud.api.metrics import ApiMetrics
from gpucloud.clock import Clock
from gpucloud.ledger import Ledger

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 5.0
# At most one pass per MIN_GAP_S under a stream of ingestions: a pass costs a little
# per pass besides its work per meter, so passes that each cover more batches cost
# less in all; the lag this adds is far below the 2 s usage-to-balance goal.
MIN_GAP_S = 0.1


class RatingLoop:
    def __init__(
        self,
        ledger: Ledger,
        clock: Clock,
        metrics: ApiMetrics,
        interval_s: float,
        gate: FairLock | None = None,
    ) -> None:
        self.ledger = ledger
        self.gate = gate or FairLock()
        self.clock = clock
        self.metrics = metrics
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self._pending: list[float] = []  # monotonic times of ingestions not yet rated
        self._task: asyncio.Task[None] | None = None
        self._last_expire = 0.0
        self.passes = 0

    def notify(self) -> None:
        """Called after a batch is stored (from the event loop's thread)."""
        self._pending.append(time.monotonic())
        self._wake.set()

    def notify_threadsafe(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self.notify)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gpucloud-rating")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            gap = MIN_GAP_S - (time.monotonic() - last)
            if gap > 0:
                await asyncio.sleep(gap)
            last = time.monotonic()
            self._wake.clear()
            covered, self._pending = self._pending, []
            try:
                await self.run_once()
            except Exception:  # keep rating alive; the next pass retries the same usage
                log.exception("rating pass failed")
                self.metrics.rating_errors.inc()
                self._pending = covered + self._pending
                await asyncio.sleep(min(self.interval_s, 1.0))
                continue
            done = time.monotonic()
            for t in covered:
                self.metrics.rating_lag.observe(done - t)

    def _rate(self) -> int:
        stage = self.metrics.stage_seconds
        waited = time.perf_counter()
        with self.gate.urgent():
            stage.labels("gate_wait").observe(time.perf_counter() - waited)
            with stage.labels("rate").time():
                return self.ledger.rate_pending(self.clock.now())

    async def run_once(self) -> int:
        # One call drains every meter with usage committed before it started; usage
        # stored meanwhile has woken the loop again.
        total = await to_thread.run_sync(self._rate)
        self.passes += 1
        if time.monotonic() - self._last_expire >= EXPIRE_EVERY_S:
            self._last_expire = time.monotonic()
            await to_thread.run_sync(self.ledger.expire_orders, self.clock.now())
        return total
