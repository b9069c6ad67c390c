"""The write gate: FIFO for ingestions, the rating loop ahead of the queue."""

from __future__ import annotations

import threading
import time

from gpucloud.api.gate import FairLock


def _wait_queued(lock: FairLock, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(lock._queue) + len(lock._urgent) < n:
        assert time.monotonic() < deadline, "waiters did not queue"
        time.sleep(0.001)


def test_waiters_enter_in_arrival_order_and_urgent_goes_first() -> None:
    lock = FairLock()
    order: list[str] = []
    lock.acquire()  # held while the others queue up

    def ordinary(name: str) -> None:
        with lock:
            order.append(name)

    def urgent() -> None:
        with lock.urgent():
            order.append("rating")

    threads = []
    for i, target in enumerate([ordinary, ordinary, ordinary]):
        t = threading.Thread(target=target, args=(f"ingest-{i}",))
        t.start()
        threads.append(t)
        _wait_queued(lock, i + 1)
    t = threading.Thread(target=urgent)
    t.start()
    threads.append(t)
    _wait_queued(lock, 4)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == ["rating", "ingest-0", "ingest-1", "ingest-2"]


def test_mutual_exclusion_under_contention() -> None:
    lock = FairLock()
    inside = 0
    worst = 0

    def work() -> None:
        nonlocal inside, worst
        for _ in range(200):
            with lock:
                inside += 1
                worst = max(worst, inside)
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert worst == 1
