"""The write gate: FIFO for ingestions, the rating loop ahead of the queue."""

from __future__ import annotations

import threading
import time

from gpucloud.api.gate import FairLock, GroupCommit


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


def _submit_all(group: GroupCommit[int, str], items: list[int]) -> dict[int, object]:
    """Submit each item from its own thread, in order (each queued before the next)."""
    out: dict[int, object] = {}

    def call(item: int) -> None:
        try:
            out[item] = group.submit(item)
        except Exception as exc:
            out[item] = exc

    threads = []
    for item in items:
        t = threading.Thread(target=call, args=(item,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while len(group._pending) < len(threads):
            assert time.monotonic() < deadline, "item did not queue"
            time.sleep(0.001)
    return {"threads": threads, "out": out}  # type: ignore[dict-item]


def _finish(started: dict[int, object]) -> dict[int, object]:
    for t in started["threads"]:  # type: ignore[attr-defined]
        t.join(5)
        assert not t.is_alive()
    return started["out"]  # type: ignore[return-value]


def test_group_commit_writes_what_queued_behind_the_gate_in_one_call() -> None:
    gate = FairLock()
    calls: list[list[int]] = []

    def write(items: list[int]) -> list[str]:
        calls.append(items)
        return [f"r{i}" for i in items]

    group: GroupCommit[int, str] = GroupCommit(gate, write, size=lambda i: i, max_size=10)
    gate.acquire()  # a write in progress: the next ones queue up
    started = _submit_all(group, [3, 4, 2, 5, 1])
    gate.release()
    out = _finish(started)
    # oldest first, at most 10 in a group: [3, 4, 2] (9; +5 would be 14), then [5, 1]
    assert calls == [[3, 4, 2], [5, 1]]
    assert out == {3: "r3", 4: "r4", 2: "r2", 5: "r5", 1: "r1"}
    assert group.submit(7) == "r7" and calls[-1] == [7]  # alone: a group of one


def test_group_commit_failure_reaches_every_caller_of_the_group_only() -> None:
    gate = FairLock()
    fail = [True]

    def write(items: list[int]) -> list[str]:
        if fail[0]:
            fail[0] = False
            raise RuntimeError(f"disk full writing {items}")
        return [f"r{i}" for i in items]

    group: GroupCommit[int, str] = GroupCommit(gate, write)
    gate.acquire()
    started = _submit_all(group, [1, 2, 3])
    gate.release()
    out = _finish(started)
    assert all(isinstance(out[i], RuntimeError) for i in (1, 2, 3))
    assert str(out[1]) == "disk full writing [1, 2, 3]"
    assert group.submit(4) == "r4"  # the next group is written
