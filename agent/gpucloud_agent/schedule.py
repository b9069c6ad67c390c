"""A drift-free tick schedule: tick n is due at start + n * period on the monotonic clock.

Sleeping a fixed period after each sample would accumulate the sample's own cost and
the scheduler's lateness into drift; computing each deadline from the start does not.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from gpucloud.clock import monotonic


class Ticker:
    def __init__(
        self,
        period_s: float,
        now: Callable[[], float] = monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"sample period must be > 0 s, got {period_s}")
        self.period_s = period_s
        self._now = now
        self._stop = threading.Event()
        # wait(timeout) returns True when stopped (threading.Event.wait semantics)
        self._wait = wait or self._stop.wait
        self.start = now()
        self.n = 0
        self.skipped = 0

    def next(self) -> float | None:
        """Block until the next tick is due; its lateness in seconds, or None once stopped."""
        self.n += 1
        due = self.start + self.n * self.period_s
        delay = due - self._now()
        if delay > 0 and self._wait(delay):
            return None
        if self._stop.is_set():
            return None
        late = self._now() - due
        if late >= self.period_s:
            # we overran whole periods (e.g. suspended): skip them, stay on the grid
            behind = math.floor(late / self.period_s)
            self.n += behind
            self.skipped += behind
            late -= behind * self.period_s
        return max(late, 0.0)

    def stop(self) -> None:
        self._stop.set()
