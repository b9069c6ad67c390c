"""A first-come-first-served lock for the ledger's hot writes in this process, with a
priority lane for the rating loop.

Ingestion and the rating loop both write. SQLite serialises writers with a busy
timeout that is not fair: under a stream of ingestions a rating pass could wait for
seconds, and the usage-to-balance lag would grow with the load. Here ingestions queue
in arrival order, and a rating pass goes next, ahead of queued ingestions, so it waits
for at most the one write in progress. (With the GIL, in-process write concurrency
buys little even on PostgreSQL.)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class FairLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._queue: deque[object] = deque()
        self._urgent: deque[object] = deque()

    def _head(self) -> object | None:
        if self._urgent:
            return self._urgent[0]
        return self._queue[0] if self._queue else None

    def acquire(self, urgent: bool = False) -> None:
        me = object()
        lane = self._urgent if urgent else self._queue
        with self._cond:
            lane.append(me)
            while self._held or self._head() is not me:
                self._cond.wait()
            lane.popleft()
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextmanager
    def urgent(self) -> Iterator[None]:
        """Acquire ahead of every ordinary waiter."""
        self.acquire(urgent=True)
        try:
            yield
        finally:
            self.release()
