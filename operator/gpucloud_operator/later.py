"""Calls run after a delay, all on one daemon thread: the operator's short follow-ups
(re-touching a claim the volume controller missed) without a thread or a Kopf timer
per object."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Later:
    def __init__(self, name: str = "gpucloud-later") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()  # ties run in the order they were asked for
        self._thread: threading.Thread | None = None
        self.ran = 0  # calls finished (tests wait on it)

    def call(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once, ``delay_s`` seconds from now. Errors are logged."""
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(timeout=wait)
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # one failed follow-up must not stop the others
                log.exception("delayed call failed")
            with self._cv:
                self.ran += 1
