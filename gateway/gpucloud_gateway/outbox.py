"""The usage outbox: a request's usage is committed before its caller has the answer.

The gateway awaits :meth:`Outbox.record` before it sends a response's last bytes (the
final chunk of a body of known length, the ``data: [DONE]`` event of a stream, or the
end of a chunked body), so a caller never holds a complete answer whose usage a
``kill -9`` could still lose. One writer thread commits whatever records are waiting in
one transaction (group commit) to the billing store's own SQLite file: recording never
waits on the ledger. :class:`LedgerPoster` drains the committed rows into the ledger in
the background, from startup on; only it knows the ledger, so moving model money to
another ledger changes the poster, not the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from gpucloud.billing.model_charges import ModelPlan, UsageEvent
from gpucloud.modelstore import BillingStore, Poster

log = logging.getLogger(__name__)

MAX_BATCH = 1000

# (plan, event, payer, loop and future to resolve once committed, or None)
_Item = tuple[ModelPlan, UsageEvent, str | None, Any, "asyncio.Future[None] | None"]


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():  # the request was cancelled meanwhile: its record stands anyway
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class Outbox:
    """Durable usage records, committed by one writer thread in groups."""

    def __init__(self, store: BillingStore, on_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        self.on_commit = on_commit  # e.g. wake the poster (called from the writer thread)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-outbox", daemon=True)
        self._thread.start()

    async def record(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Return once the record is committed (raises if it could not be)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((plan, event, payer, loop, fut))
        await fut

    def alive(self) -> bool:
        """The writer thread runs: records can become durable (readiness)."""
        return self._thread.is_alive()

    def record_later(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Queue a record nobody waits for (a cut response: the caller has no answer)."""
        self._queue.put((plan, event, payer, None, None))

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            error: BaseException | None = None
            try:
                self.store.record_many([(p, e, payer) for p, e, payer, _, _ in batch])
            except Exception as exc:  # the waiting requests fail: no answer without a record
                log.exception("committing %d usage records failed", len(batch))
                error = exc
            for *_, loop, fut in batch:
                if fut is not None:
                    loop.call_soon_threadsafe(_resolve, fut, error)
            if error is None and self.on_commit is not None:
                self.on_commit()

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)


class LedgerPoster:
    """Posts committed usage to the ledger: at startup (rows a killed gateway left), after
    each commit, and every ``tick_s`` while rows wait (a ledger that was down or slow).
    It also checkpoints the store every ``tick_s`` (not every pass: a checkpoint syncs
    the disk), so with ``fsync: false`` a host crash loses at most the records of the
    last ``tick_s`` seconds and a pass's time (a killed process loses none)."""

    def __init__(self, store: BillingStore, ledger: Poster | None, tick_s: float = 1.0) -> None:
        self.store = store
        self.ledger = ledger
        self.tick_s = tick_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._checkpointed = 0.0  # time.monotonic() of the last checkpoint

    def wake(self) -> None:
        """Thread-safe: new rows were committed."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="ledger-poster")

    def _pass(self) -> None:
        if time.monotonic() - self._checkpointed >= self.tick_s:
            self._checkpointed = time.monotonic()
            self.store.checkpoint()
        if self.ledger is None:
            return
        try:
            while self.store.post_pending(self.ledger) == MAX_BATCH:
                pass
        except Exception:  # they stay pending: the next pass retries
            log.exception("posting model charges to the ledger failed")

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()  # before the pass: a commit during it wakes the next one
            try:
                await asyncio.to_thread(self._pass)
            except Exception:
                log.exception("usage poster pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Stop, after one last pass (bounded: everything unposted is durable anyway)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._pass), timeout_s)
        except TimeoutError:
            log.warning(
                "usage poster: %d rows still unposted after %.0fs; posted at the next start",
                self.store.pending(),
                time.monotonic() - started,
            )
