"""Concurrent writers (threads and processes) on both databases: no lost update, no
double posting, the cached balance equals the sum of the entries and the expected figure."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from ledger_helpers import T0, T0_S, expected_balance, gpu_record, post_many, worker_context

from gpucloud.billing.money import to_minor
from gpucloud.ledger import Ledger, OrderRefused

WORKERS, COUNT, SHARED = 6, 40, 20


def _check_statement(ledger: Ledger, expected: int, entries: int) -> None:
    rows = ledger.entries("acct", limit=10_000)
    assert len(rows) == entries
    running = 0
    for row in rows:  # balance_after is a gap-free running sum: no update was lost
        running += row.amount_minor
        assert row.balance_after == running
    assert ledger.balance("acct") == ledger.entries_sum("acct") == running == expected


def test_threads_post_concurrently(ledger_url: str, ledger: Ledger) -> None:
    ledger.ensure_account("acct")
    observed: list[int] = []
    with ThreadPoolExecutor(WORKERS + 1) as pool:
        futures = [pool.submit(post_many, ledger_url, w, COUNT, SHARED) for w in range(WORKERS)]
        while not all(f.done() for f in futures):  # a reader racing the writers
            observed.append(ledger.balance("acct"))
        created = sum(f.result(timeout=120) for f in futures)
    assert created == SHARED  # every shared key posted exactly once
    _check_statement(ledger, expected_balance(WORKERS, COUNT, SHARED), WORKERS * COUNT + SHARED)
    # Every balance a reader saw was the balance after some prefix of the entries.
    prefixes = {0} | {e.balance_after for e in ledger.entries("acct", limit=10_000)}
    assert observed and set(observed) <= prefixes


@pytest.mark.slow
def test_processes_post_concurrently(ledger_url: str, ledger: Ledger) -> None:
    ledger.ensure_account("acct")
    with ProcessPoolExecutor(3, mp_context=worker_context()) as pool:
        futures = [pool.submit(post_many, ledger_url, w, 30, 10) for w in range(3)]
        created = sum(f.result(timeout=120) for f in futures)
    assert created == 10
    _check_statement(ledger, expected_balance(3, 30, 10), 3 * 30 + 10)


def test_concurrent_ingest_and_rating_never_double_charge(ledger: Ledger) -> None:
    ledger.ensure_account("acct")
    price = Decimal("2.57")
    ledger.open_meter(
        "m",
        account="acct",
        resource="r",
        kind="gpu_time",
        subject="pod-1",
        unit_price=price,
        unit="gpu_hour",
        opened_at=T0,
        gpus=2,
    )
    windows = 150
    batches = [
        [gpu_record(T0_S + 10 * i, gpu=g) for g in ("GPU-a", "GPU-b")] for i in range(windows)
    ]
    later = T0 + timedelta(days=1)

    def ingest(part: int) -> None:
        for batch in batches[part::3]:
            ledger.ingest_usage(batch, received_at=T0)
            ledger.ingest_usage(batch, received_at=T0)  # a re-send: duplicates

    def rate() -> int:
        return sum(ledger.rate_pending(later) for _ in range(30))

    with ThreadPoolExecutor(5) as pool:
        jobs = [pool.submit(ingest, p) for p in range(3)] + [pool.submit(rate) for _ in range(2)]
        for job in jobs:
            job.result(timeout=120)
    ledger.rate_pending(later)
    seconds = windows * 10 * 2
    assert ledger.get_meter("m").quantity_rated == seconds
    expected = -to_minor(Fraction(seconds) * Fraction(price) / 3600)
    assert ledger.balance("acct") == ledger.entries_sum("acct") == expected
    keys = [e.key for e in ledger.entries("acct", limit=10_000)]
    assert keys == [f"meter:m:{n}" for n in range(1, len(keys) + 1)]


def test_concurrent_settlement_credits_once(ledger: Ledger) -> None:
    ledger.ensure_account("acct")
    oid = ledger.create_order("acct", 999, "alipay", T0 + timedelta(hours=1)).order_id

    def settle(i: int) -> str:
        try:
            return ledger.settle_order(oid, "txn" if i % 2 else f"other-{i}", 999, T0).status
        except OrderRefused as exc:
            return exc.reason

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(settle, range(16)))
    assert ledger.balance("acct") == 999
    assert len(ledger.entries("acct")) == 1
    assert outcomes.count("paid") >= 1
    assert set(outcomes) <= {"paid", "already_settled"}
