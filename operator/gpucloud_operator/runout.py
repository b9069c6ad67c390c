"""Enforcement at the predicted instant, not at the next poll: an account's money
running out (docs/arrears.md, "When enforcement happens") and a ``StopPayAsYouGo``
budget being spent (docs/budgets.md, "Enforcement").

Rules (one mechanism for both):

1. **One alarm per account**, keyed by its name, at the earliest instant one of its
   predictions falls due; its call is an account pass (``refresh_named``). Each account
   pass knows the figures, so it predicts with ``run_out_at`` (an amount left, spent at
   a burn rate):

   - *run-out*: the available balance at the account's burn rate, less a minor unit per
     unsettled meter; none while in arrears;
   - *a StopPayAsYouGo budget spent*: for each such scope (the account's, or one
     namespace's) not spent yet, what its budget has left (monthly less spent) at the
     burn rate of the scope's namespaces, less a minor unit per unsettled meter of the
     scope.

2. **Early, never late.** The slack covers the ledger's rounding of each meter on its
   own, and the burn rate counts storage, which is posted hourly, not accrued: a pass
   that comes early finds nothing due and predicts again, a second at a time near the
   end. The exception is a charge posted in one step that no burn rate predicts (an
   hour of storage crossing a budget just after a pass, a model's online time, gateway
   requests): the first account pass after it is posted sees it, at most
   ``account_interval_s`` later.
3. **Every pass moves or cancels the alarm** from its own figures (a recharge or a
   larger budget pushes it back, a new instance brings it forward; nothing predicted
   cancels it). The periodic pass (``account_interval_s``) stays as the safety net, and
   after a restart it sets the alarms again.
4. **The pass that finds it due acts at once**, after patching the Account's status: it
   drops the cached Account list and wakes the instances concerned
   (``AccountReconciler._enforce_now`` -> ``wake_instance``) instead of waiting for
   their ticks: every active instance of the account on entering arrears; the active
   pay-as-you-go and spot instances of a spent StopPayAsYouGo scope, on every pass that
   finds it spent (none is left once they are stopped). Each instance pass confirms
   against the ledger and stops the run at its own ``now``, settled by the second.

Locks and state (the rules of ``instances/concurrency.py`` hold here too: everything is
a hint, the record is the Account's status and the ledger, a restart empties it and the
periodic pass rebuilds it):

``Alarms._cv``
    A leaf lock over ``_due`` (key -> (instant, call)) and ``_heap`` (instants in order,
    stale entries skipped): held for a few dictionary and heap operations, never while
    a call runs. A call runs on the pool, so a slow pass never delays another alarm.
``AccountReconciler._locks[account]``
    One pass per account at a time, the alarms' and the Kopf handlers'. Under it a Kopf
    pass that follows an alarm's status patch (``_alarm_written``, under the leaf
    ``_guard``) reads the Account again: Kopf's body may predate the patch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal

from gpucloud.billing import minor_exponent
from gpucloud.clock import Clock

log = logging.getLogger(__name__)

ONE_SECOND = timedelta(seconds=1)


def run_out_at(
    now: datetime,
    available_minor: int,
    slack_minor: int,
    burn_per_hour: Decimal,
    currency: str,
) -> datetime | None:
    """The whole second at which the next pass should look: when ``available_minor``
    (the available balance, or what a budget has left) less ``slack_minor`` is spent at
    ``burn_per_hour`` (currency units), never before ``now + 1 s``; None when nothing
    burns. ``slack_minor`` covers rounding: the ledger rounds each meter's accrual on its
    own (half to even), so with n open meters the amount can be spent up to n/2 minor
    units before the exact figure says; the pass is early, finds some left and asks
    again, one second at a time near the end, but never late."""
    if burn_per_hour <= 0:
        return None
    per_second = burn_per_hour * 10 ** minor_exponent(currency) / 3600
    seconds = math.floor(Decimal(available_minor - slack_minor) / per_second)
    return now + max(ONE_SECOND, timedelta(seconds=seconds))


class Alarms:
    """Calls keyed by name, each run once at an instant of ``clock`` (checked at least
    every ``max_sleep_s`` real seconds, so a file clock that jumps is noticed)."""

    def __init__(self, clock: Clock, workers: int = 4, max_sleep_s: float = 0.5) -> None:
        self.clock = clock
        self.max_sleep_s = max_sleep_s
        self._due: dict[str, tuple[datetime, Callable[[], None]]] = {}
        self._heap: list[tuple[datetime, int, str]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._submit = background(workers, "gpucloud-alarm")
        self._thread: threading.Thread | None = None
        self.fired = 0  # calls handed to the pool (tests and the bench read it)

    def set(self, key: str, at: datetime, call: Callable[[], None]) -> None:
        """Run ``call()`` at ``at`` (replaces the pending alarm of ``key``)."""
        with self._cv:
            self._due[key] = (at, call)
            heapq.heappush(self._heap, (at, next(self._seq), key))
            self._cv.notify()

    def cancel(self, key: str) -> None:
        with self._cv:
            self._due.pop(key, None)

    def when(self, key: str) -> datetime | None:
        with self._cv:
            hit = self._due.get(key)
        return hit[0] if hit else None

    def take_due(self) -> list[Callable[[], None]]:
        """Remove and return the calls due at the clock's now (earliest first)."""
        now = self.clock.now()
        out: list[Callable[[], None]] = []
        with self._cv:
            while self._heap and self._heap[0][0] <= now:
                at, _, key = heapq.heappop(self._heap)
                hit = self._due.get(key)
                if hit is not None and hit[0] == at:  # else moved or cancelled
                    del self._due[key]
                    out.append(hit[1])
        return out

    def run_due(self) -> int:
        """Run the due calls here, one after another (unit tests); how many ran."""
        calls = self.take_due()
        for call in calls:
            call()
        return len(calls)

    def start(self) -> None:
        """Watch the clock on a daemon thread and run due calls on the pool."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="alarms", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            for call in self.take_due():
                self._submit(call)
                self.fired += 1
            with self._cv:
                wait = self.max_sleep_s
                if self._heap:  # the real time left, if the clock runs at real speed
                    left = (self._heap[0][0] - self.clock.now()).total_seconds()
                    wait = min(wait, left)
                if wait > 0:
                    self._cv.wait(timeout=wait)


def background(workers: int, name: str) -> Callable[[Callable[[], None]], None]:
    """A function that runs calls on a pool of ``workers`` threads, logging errors (one
    failed pass must not stop the others)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def safely(call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            log.exception("%s: call failed", name)

    def submit(call: Callable[[], None]) -> None:
        pool.submit(safely, call)

    return submit
