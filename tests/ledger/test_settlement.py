"""Meter settlement: a closed run is billed for good (agents' usage, else control-plane
timestamps), and usage that arrives afterwards is stored and counted, never charged."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0, T0_S, disk_record, gpu_record
from sqlalchemy import create_engine, text

from gpucloud.billing.money import to_minor
from gpucloud.ledger import InvalidInput, Ledger, open_ledger
from gpucloud.ledger.db import MIGRATIONS
from gpucloud.ledger.entries import Entries
from gpucloud.ledger.schema import to_us
from gpucloud.testing.postgres import create_database

PRICE = Decimal("5.20")
CLOSE = T0 + timedelta(seconds=1000)
SETTLE = CLOSE + timedelta(seconds=60)
LATER = SETTLE + timedelta(hours=1)


def _meter(ledger: Ledger, meter_id: str = "m1", gpus: int = 1, pod: str = "pod-1") -> None:
    ledger.ensure_account("alice")
    ledger.open_meter(
        meter_id,
        account="alice",
        resource="team-a/nb",
        kind="gpu_time",
        subject=pod,
        unit_price=PRICE,
        unit="gpu_hour",
        opened_at=T0,
        gpus=gpus,
    )


def _windows(lo: int, hi: int, gpu: str = "GPU-a", pod: str = "pod-1") -> list[Any]:
    return [gpu_record(T0_S + s, 10, gpu=gpu, pod_uid=pod) for s in range(lo, hi, 10)]


def _cost(gpu_seconds: int, price: Decimal = PRICE) -> int:
    return to_minor(Fraction(gpu_seconds) * Fraction(price) / 3600)


def test_late_usage_after_the_fallback_is_stored_but_not_charged(ledger: Ledger) -> None:
    _meter(ledger)
    ledger.ingest_usage(_windows(0, 400), received_at=T0, rate_at=CLOSE)
    ledger.close_meter("m1", CLOSE)
    assert ledger.balance("alice") == -_cost(400) == -58
    m = ledger.settle_meter("m1", SETTLE, fallback=True, memo="from the control plane")
    assert m.settled_at == SETTLE and m.fallback_quantity == 600
    assert m.fallback_minor == _cost(1000) - _cost(400) == 86
    assert m.posted_minor == _cost(1000) == 144 == -ledger.balance("alice")
    fallback = ledger.get_entry("meter-fallback:m1")
    assert fallback.amount_minor == -86 and fallback.meta["gpu_seconds"] == 600
    assert fallback.memo == "from the control plane" and fallback.resource == "team-a/nb"

    # the agent's usage for the rest of the run arrives late, on both rating paths
    late = _windows(400, 1000)
    result = ledger.ingest_usage(late[:30], received_at=LATER, rate_at=LATER)
    assert result.accepted == 30
    ledger.ingest_usage(late[30:], received_at=LATER)
    ledger.rate_pending(LATER)
    m = ledger.get_meter("m1")
    assert (m.late_records, m.late_quantity, m.quantity_rated) == (60, 600, 400)
    assert ledger.balance("alice") == -144 == ledger.entries_sum("alice")
    assert ledger.unrated_usage() == []  # handled: counted on the meter, not left pending
    assert [x.meter_id for x in ledger.meters(late_only=True)] == ["m1"]
    # a re-sent late record is a duplicate: counted once
    assert ledger.ingest_usage(late[:5], received_at=LATER, rate_at=LATER).duplicates == 5
    assert ledger.rate_pending(LATER) == 0
    assert ledger.get_meter("m1").late_records == 60
    assert ledger.balance("alice") == -144


def test_settlement_is_idempotent_and_covered_runs_get_no_fallback(ledger: Ledger) -> None:
    _meter(ledger)
    ledger.ingest_usage(_windows(0, 1000), received_at=T0)  # not rated yet: settle rates it
    ledger.close_meter("m1", CLOSE)
    first = ledger.settle_meter("m1", SETTLE, fallback=True)
    assert first.quantity_rated == 1000 and first.fallback_quantity == 0
    assert first.fallback_minor == 0 and first.posted_minor == 144
    again = ledger.settle_meter("m1", LATER, fallback=True)
    assert again == first  # the first settlement stands
    keys = [e.key for e in ledger.entries("alice")]
    assert not any(k.startswith("meter-fallback:") for k in keys)
    assert ledger.balance("alice") == -144


def test_settling_twice_posts_the_fallback_once(ledger: Ledger) -> None:
    _meter(ledger, gpus=2)
    ledger.close_meter("m1", CLOSE)
    for _ in range(3):
        ledger.settle_meter("m1", SETTLE, fallback=True)
    assert [e.key for e in ledger.entries("alice")] == ["meter-fallback:m1"]
    assert ledger.balance("alice") == -_cost(2000)


def test_settlement_rules(ledger: Ledger) -> None:
    _meter(ledger)
    with pytest.raises(InvalidInput, match="meter_id: meter 'm1' is still open"):
        ledger.settle_meter("m1", SETTLE, fallback=True)
    ledger.close_meter("m1", CLOSE)
    with pytest.raises(InvalidInput, match=r"at: .* is before the meter closed"):
        ledger.settle_meter("m1", CLOSE - timedelta(seconds=1))
    ledger.open_meter(
        "disk",
        account="alice",
        resource="team-a/disk",
        kind="cloud_disk",
        subject="disk-1",
        unit_price=Decimal("0.0004"),
        unit="gb_hour",
        opened_at=T0,
    )
    ledger.close_meter("disk", CLOSE)
    with pytest.raises(InvalidInput, match="fallback: only gpu_time meters"):
        ledger.settle_meter("disk", SETTLE, fallback=True)
    # without a fallback any meter can be settled; later usage is counted, not charged
    ledger.settle_meter("disk", SETTLE)
    ledger.ingest_usage([disk_record(T0_S, 600, 2**30, volume="disk-1")], received_at=LATER)
    ledger.rate_pending(LATER)
    disk = ledger.get_meter("disk")
    assert (disk.late_records, disk.late_quantity, disk.posted_minor) == (1, 600 * 2**30, 0)


def test_settlement_without_fallback_bills_only_what_agents_reported(ledger: Ledger) -> None:
    _meter(ledger)
    ledger.ingest_usage(_windows(0, 500), received_at=T0)
    ledger.close_meter("m1", CLOSE)
    m = ledger.settle_meter("m1", SETTLE)
    assert (m.quantity_rated, m.fallback_quantity, m.posted_minor) == (500, 0, _cost(500))
    ledger.ingest_usage(_windows(500, 1000), received_at=LATER, rate_at=LATER)
    assert ledger.balance("alice") == -_cost(500)


def test_a_crash_inside_settlement_leaves_nothing_half_done(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    _meter(ledger)
    ledger.close_meter("m1", CLOSE)
    real_post = Entries.post  # the posting primitive settlement calls

    def post_then_die(self: Entries, *args: Any) -> Any:
        real_post(self, *args)
        raise RuntimeError("killed between the entry and the settlement mark")

    monkeypatch.setattr(Entries, "post", post_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        ledger.settle_meter("m1", SETTLE, fallback=True)
    monkeypatch.undo()
    assert ledger.balance("alice") == 0 and ledger.entries("alice") == []
    assert ledger.get_meter("m1").settled_at is None
    assert ledger.settle_meter("m1", SETTLE, fallback=True).posted_minor == 144
    assert ledger.balance("alice") == -144


def test_a_fallback_posted_before_settlement_existed_is_adopted(ledger: Ledger) -> None:
    _meter(ledger)
    ledger.close_meter("m1", CLOSE)
    # what an earlier operator did: the fallback as a plain entry, the meter untouched
    ledger.post_entry("alice", "charge", -144, "meter-fallback:m1", resource="team-a/nb", at=SETTLE)
    m = ledger.settle_meter("m1", SETTLE, fallback=True)
    assert (m.fallback_minor, m.posted_minor) == (144, 144)
    ledger.ingest_usage(_windows(0, 1000), received_at=LATER, rate_at=LATER)
    assert ledger.balance("alice") == -144
    assert ledger.get_meter("m1").late_quantity == 1000


def test_gpus_seen_for_a_pod(ledger: Ledger) -> None:
    _meter(ledger, pod="pod-1", gpus=2)
    ledger.ingest_usage(
        _windows(0, 30, gpu="GPU-b") + _windows(0, 30, gpu="GPU-other", pod="pod-2"),
        received_at=T0,
        rate_at=CLOSE,  # pod-1's usage rated by its meter, pod-2's has no meter
    )
    ledger.ingest_usage(_windows(100, 120, gpu="GPU-a"), received_at=T0)  # unrated
    assert ledger.gpus_seen("pod-1") == ["GPU-a", "GPU-b"]
    assert ledger.gpus_seen("pod-2") == ["GPU-other"]
    assert ledger.gpus_seen("pod-1", since=T0 + timedelta(seconds=50)) == ["GPU-a"]
    assert ledger.gpus_seen("pod-3") == []


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    price=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99"), places=2),
    gpus=st.integers(1, 3),
    held=st.integers(1, 120),
    windows=st.lists(
        st.tuples(st.integers(1, 10), st.sampled_from("early late lost")), max_size=40
    ),
    fallback=st.booleans(),
)
def test_a_run_is_charged_at_most_once_per_second_held(
    ledger: Ledger,
    price: Decimal,
    gpus: int,
    held: int,
    windows: list[tuple[int, str]],
    fallback: bool,
) -> None:
    """Each GPU reports consecutive windows (some past the close); each window arrives
    before the settlement, after it, or never. Charged GPU-seconds ==
    min(held, metered + fallback): all of the run with the fallback, else the metered."""
    meter_id = uuid.uuid4().hex
    pod, account = f"pod-{meter_id}", f"acct-{meter_id}"
    ledger.ensure_account(account)
    ledger.open_meter(
        meter_id,
        account=account,
        resource="r",
        kind="gpu_time",
        subject=pod,
        unit_price=price,
        unit="gpu_hour",
        opened_at=T0,
        gpus=gpus,
    )
    close = T0 + timedelta(seconds=held)
    early, late = [], []
    metered = 0
    for g in range(gpus):
        start = T0_S
        for length, when in windows:
            record = gpu_record(start, length, gpu=f"GPU-{meter_id}-{g}", pod_uid=pod)
            if when == "early":
                early.append(record)
                metered += max(0, min(start + length, T0_S + held) - start)
            elif when == "late":
                late.append(record)
            start += length
    ledger.ingest_usage(early, received_at=T0, rate_at=close)
    ledger.close_meter(meter_id, close)
    ledger.settle_meter(meter_id, close + timedelta(seconds=60), fallback=fallback)
    ledger.ingest_usage(late, received_at=LATER, rate_at=LATER)
    ledger.rate_pending(LATER)

    held_gpu_s = gpus * held
    charged_s = held_gpu_s if fallback else min(held_gpu_s, metered)
    assert -ledger.balance(account) == _cost(charged_s, price) <= _cost(held_gpu_s, price)
    m = ledger.get_meter(meter_id)
    assert m.posted_minor == -ledger.balance(account)
    assert m.late_quantity <= held_gpu_s - metered  # only the run's seconds count as late


def _upgrade_to(url: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    postgres_url: str = request.getfixturevalue("postgres_url")
    return create_database(postgres_url, f"mig_{uuid.uuid4().hex[:12]}")


def _bill_the_old_way(url: str) -> None:
    """What the 0001-era operator left behind: a closed meter and its fallback posted as
    a plain entry (raw SQL: the current code reads columns 0001 does not have)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ledger_accounts (name, currency, balance_minor, created_at) "
                "VALUES ('alice', 'CNY', -144, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO ledger_meters (meter_id, account_id, resource, kind, subject, "
                "unit_price, unit, opened_at, closed_at, memo, gpus, quantity_rated, "
                "posted_minor, seq) VALUES ('m1', 1, 'team-a/nb', 'gpu_time', 'pod-1', "
                "'5.20', 'gpu_hour', :opened, :closed, '', 1, '0', 0, 0)"
            ),
            {"opened": to_us(T0), "closed": to_us(CLOSE)},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_entries (account_id, kind, amount_minor, key, memo, at, "
                "meta, balance_after, recorded_at) VALUES (1, 'charge', -144, "
                "'meter-fallback:m1', '', :at, :meta, -144, 0)"
            ),
            {"at": to_us(SETTLE), "meta": '{"gpu_seconds": 1000}'},
        )
    engine.dispose()


def test_migration_settles_meters_an_earlier_operator_billed(fresh_url: str) -> None:
    _upgrade_to(fresh_url, "0001")
    _bill_the_old_way(fresh_url)
    ledger = open_ledger(fresh_url)  # migrates to head
    try:
        m = ledger.get_meter("m1")
        assert m.settled_at == SETTLE
        assert (m.posted_minor, m.fallback_minor, m.fallback_quantity) == (144, 144, 1000)
        ledger.ingest_usage(_windows(0, 1000), received_at=LATER, rate_at=LATER)
        assert ledger.balance("alice") == -144
        assert ledger.get_meter("m1").late_records == 100
    finally:
        ledger.close()
