"""The scale bench's bill check (bench/operator_scale_bench.py) finds a wrong bill: runs
billed as the operator bills them (a meter T0 -> T1 settled from control-plane
timestamps, an hour of storage) pass; a fen more, a meter closed a second late, or a
missing storage hour is reported, and the bench then exits non-zero."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gpucloud.ledger import EntryKind, Ledger, open_ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import operator_scale_bench as bench


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    monkeypatch.setattr(bench, "INSTANCES", 6)
    monkeypatch.setattr(bench, "ACCOUNTS", 2)
    led = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for a in range(bench.ACCOUNTS):
        led.ensure_account(f"scale-{a:02d}", "CNY")
        led.post_entry(f"scale-{a:02d}", EntryKind.RECHARGE, 10**9, f"fund-{a}", at=bench.T0)
    yield led
    led.close()


def bill(led: Ledger, i: int, close: timedelta = timedelta(0), storage_hours: int = 1) -> None:
    """Instance ``i`` billed as the operator does (no agents: the fallback settles it)."""
    gpu, storage = bench.prices()
    product, count = bench.shape(i)
    account, resource = bench.namespace(i), f"{bench.namespace(i)}/i{i:04d}"
    meter = f"m-{i}"
    led.open_meter(
        meter,
        account=account,
        resource=resource,
        kind="gpu_time",
        subject=f"pod-{i}",
        unit_price=Decimal(gpu[product].numerator) / gpu[product].denominator,
        unit="gpu_hour",
        opened_at=bench.T0,
        gpus=count,
    )
    led.close_meter(meter, bench.T1 + close)
    led.settle_meter(meter, bench.T1 + timedelta(seconds=301), fallback=True)
    for h in range(storage_hours):
        amount = -bench.to_minor(storage * bench.QUOTA_GI)
        key = f"storage:{i}:{h}"
        led.post_entry(account, EntryKind.CHARGE, amount, key, resource=resource, at=bench.T1)


def test_bills_as_the_operator_makes_them_pass(ledger: Ledger) -> None:
    for i in range(bench.INSTANCES):
        bill(ledger, i)
    assert bench.misbilled(ledger) == []


def test_a_wrong_bill_is_reported(ledger: Ledger) -> None:
    bill(ledger, 0, close=timedelta(seconds=1))  # closed a second late
    bill(ledger, 1, storage_hours=0)  # its storage hour not charged
    for i in range(2, bench.INSTANCES):
        bill(ledger, i)
    ledger.post_entry(
        "scale-00", EntryKind.CHARGE, -1, "extra", resource="scale-00/i0004", at=bench.T1
    )
    wrong = bench.misbilled(ledger)
    assert [w.split(":")[0] for w in wrong] == [
        "scale-00/i0000",
        "scale-01/i0001",
        "scale-00/i0004",
    ]


def test_the_idle_window_moves_the_clock_only_when_asked(tmp_path: Path) -> None:
    """BENCH_IDLE_CLOCK_RATE: at rate 1 the file clock follows real time from T0 through
    the window (never past T1); at 0 it stays at T0."""
    from gpucloud.clock import FileClock

    clock = FileClock(tmp_path / "clock")
    clock.set(bench.T0)
    bench.idle_clock(clock, 0.0, 0.05)
    assert clock.now() == bench.T0
    bench.idle_clock(clock, 1.0, 0.35)
    moved = clock.now() - bench.T0
    assert timedelta(seconds=0.2) <= moved <= timedelta(seconds=0.35)
    assert clock.now() < bench.T1
