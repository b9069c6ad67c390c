"""A first-come-first-served lock for the ledger's hot writes in this process, with a
priority lane for the rating loop.

Ingestion and the rating loop both write. SQLite serialises writers with a busy
timeout that is not fair: under a stream of ingestions a rating pass could wait for
seconds, and the usage-to-balance lag would grow with the load. Here ingestions queue
in arrival order, and a rating pass goes next, ahead of queued ingestions, so it waits
for at most the one write in progress. (With the GIL, in-process write concurrency
buys little even on PostgreSQL.) ``GroupCommit`` lets the ingestions queued behind
the gate share one transaction.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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


@dataclass
class _Slot(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Writes queued behind the gate go in together: whoever gets the gate writes every
    item queued so far (up to ``max_size`` in all) with one call of ``write``, one
    transaction and one commit, and hands each caller its own result. A caller returns
    only once the call holding its item has returned, so a result still means committed;
    if that call raises, every caller of the group gets the error (nothing was stored).

    On a 2-core box a durable commit (an fsync) is a good share of a 480-record batch's
    write, and the gate makes every other request wait through it."""

    def __init__(
        self,
        gate: FairLock,
        write: Callable[[list[T]], list[R]],
        size: Callable[[T], int] = lambda _: 1,
        max_size: int = 10_000,
    ) -> None:
        self._gate, self._write, self._size, self._max = gate, write, size, max_size
        self._mutex = threading.Lock()
        self._pending: deque[_Slot[T, R]] = deque()

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._mutex:
            self._pending.append(slot)
        while not slot.done:  # another caller may write it while this one waits
            with self._gate:
                if not slot.done:
                    self._write_group(self._take())
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _take(self) -> list[_Slot[T, R]]:
        """The oldest queued items, at least one, at most max_size in all."""
        group: list[_Slot[T, R]] = []
        total = 0
        with self._mutex:
            while self._pending:
                size = self._size(self._pending[0].item)
                if group and total + size > self._max:
                    break
                group.append(self._pending.popleft())
                total += size
        return group

    def _write_group(self, group: list[_Slot[T, R]]) -> None:
        try:
            results = self._write([s.item for s in group])
        except BaseException as exc:
            for s in group:
                s.error, s.done = exc, True
            return
        for s, r in zip(group, results, strict=True):
            s.result, s.done = r, True
