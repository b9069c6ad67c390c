"""Where usage goes: off the response path, into the billing store, then the ledger.

The gateway hands each finished request's :class:`UsageEvent` to a sink. ``LedgerSink``
queues it (never blocking the response) and a background task writes batches to the
:class:`~gpucloud_gateway.billing.BillingStore` and posts pending charges to the ledger.
A ledger that is briefly unavailable only delays postings: they stay pending in the
store and go out with the next batch or the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gpucloud_gateway.billing import BillingStore, ModelPlan, Poster
from gpucloud_gateway.metering import UsageEvent

log = logging.getLogger(__name__)


class LedgerSink:
    def __init__(
        self, store: BillingStore, ledger: Poster | None = None, tick_s: float = 1.0
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.tick_s = tick_s
        self.queue: asyncio.Queue[tuple[ModelPlan, UsageEvent, str | None]] = asyncio.Queue()
        self._task: asyncio.Task[Any] | None = None

    def __call__(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Queue one request's usage (never blocks: called as the response ends)."""
        self.queue.put_nowait((plan, event, payer))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def _write(self, batch: list[tuple[ModelPlan, UsageEvent, str | None]]) -> None:
        if batch:
            self.store.record_many(batch)
        if self.ledger is not None:
            try:
                while self.store.post_pending(self.ledger) == 1000:
                    pass
            except Exception:  # stays pending; retried on the next batch or tick
                log.exception("posting model charges to the ledger failed")

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self.queue.get(), self.tick_s)
                batch = [first]
            except TimeoutError:
                batch = []
            while not self.queue.empty() and len(batch) < 1000:
                batch.append(self.queue.get_nowait())
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception:
                log.exception("recording %d usage events failed", len(batch))

    async def drain(self) -> None:
        """Write everything queued now (used at shutdown)."""
        batch = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        await asyncio.to_thread(self._write, batch)
        if self._task is not None:
            self._task.cancel()
