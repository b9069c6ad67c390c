"""Rating inside the ingest transaction (ingest_usage(rate_at=...)) and set-based
rating (rate_pending) charge exactly what ingesting first and rating after charges."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0, T0_S, disk_record, gpu_record

import gpucloud.ledger.meters as meters_module
from gpucloud.ledger import Ledger, open_ledger
from gpucloud.usage import UsageRecord

NOW = T0 + timedelta(hours=1)


def _setup(lg: Ledger, pod2_close_s: int = 25, pod1_open_s: int = 0) -> None:
    lg.ensure_account("acct")
    pod1_opened = T0 + timedelta(seconds=pod1_open_s)
    for meter_id, subject, opened in [("m1", "pod-1", pod1_opened), ("m2", "pod-2", T0)]:
        lg.open_meter(
            meter_id, account="acct", resource=f"r/{subject}", kind="gpu_time", subject=subject,
            unit_price=Decimal("9.87"), unit="gpu_hour", opened_at=opened, gpus=2,
        )  # fmt: skip
    lg.close_meter("m2", T0 + timedelta(seconds=pod2_close_s))
    lg.open_meter(
        "m3", account="acct", resource="r/pod-2", kind="gpu_time", subject="pod-2",
        unit_price=Decimal("3.33"), unit="gpu_hour", opened_at=T0 + timedelta(seconds=pod2_close_s),
        gpus=2,
    )  # fmt: skip
    lg.open_meter(
        "d1", account="acct", resource="r/disk", kind="cloud_disk", subject="disk-1",
        unit_price=Decimal("0.0007"), unit="gb_hour", opened_at=T0,
    )  # fmt: skip


def _outcome(lg: Ledger) -> tuple[object, ...]:
    meters = {m.meter_id: (m.quantity_rated, m.posted_minor) for m in lg.meters()}
    unrated = sorted((u.subject, u.start, u.rated_until) for u in lg.unrated_usage())
    return lg.balance("acct"), lg.entries_sum("acct"), meters, unrated


def test_rated_at_ingest_where_one_meter_holds_the_whole_record(ledger: Ledger) -> None:
    _setup(ledger)
    now_s = int(NOW.timestamp())
    records = [
        gpu_record(T0_S, pod_uid="pod-1"),  # inside m1: rated at ingest
        gpu_record(T0_S + 20, gpu="GPU-b", pod_uid="pod-2"),  # straddles m2's close
        gpu_record(T0_S + 30, gpu="GPU-b", pod_uid="pod-2"),  # inside m3
        gpu_record(now_s - 5, gpu="GPU-c", pod_uid="pod-1"),  # ends after now
        gpu_record(T0_S, gpu="GPU-d", pod_uid="stray"),  # no meter
        disk_record(T0_S, 3600, 2**30),  # inside d1
    ]
    result = ledger.ingest_usage(records, received_at=NOW, rate_at=NOW)
    assert (result.accepted, result.rejected) == (6, [])
    unrated = sorted((u.subject, u.start) for u in ledger.unrated_usage())
    assert unrated == [("GPU-b", T0_S + 20), ("GPU-c", now_s - 5), ("GPU-d", T0_S)]
    assert ledger.get_meter("m1").quantity_rated == 10
    assert ledger.get_meter("m3").quantity_rated == 10
    assert ledger.get_meter("d1").quantity_rated == 2**30 * 3600
    assert ledger.get_meter("m2").quantity_rated == 0
    # The rating pass takes the rest, clipped to each meter's window.
    assert ledger.rate_pending(NOW) == 2  # the straddling record, once per meter
    assert ledger.get_meter("m2").quantity_rated == 5
    assert ledger.get_meter("m3").quantity_rated == 15
    assert ledger.balance("acct") == ledger.entries_sum("acct")


def test_rate_at_gives_the_same_charges_as_rating_after(ledger: Ledger, tmp_path: Path) -> None:
    reference = open_ledger(f"sqlite:///{tmp_path / 'reference.db'}")
    for lg in (ledger, reference):
        _setup(lg)
    batches = [
        [gpu_record(T0_S + 10 * w, gpu=g, pod_uid=p) for w in range(i, i + 5)
         for g, p in (("GPU-a", "pod-1"), ("GPU-b", "pod-2"))]
        for i in range(0, 40, 5)
    ]  # fmt: skip
    for batch in batches:
        ledger.ingest_usage(batch, received_at=NOW, rate_at=NOW)
        reference.ingest_usage(batch, received_at=NOW)
        assert ledger.ingest_usage(batch, received_at=NOW, rate_at=NOW).duplicates == 10
    ledger.rate_pending(NOW)
    reference.rate_pending(NOW)
    assert _outcome(ledger) == _outcome(reference)
    assert ledger.rate_pending(NOW) == 0
    reference.close()


def test_a_backlog_is_rated_in_chunks(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meters_module, "_RATE_CHUNK", 5)
    _setup(ledger)
    # Two GPUs share every start: chunks end on whole starts (6 rows each, not 5).
    records = [gpu_record(T0_S + 10 * w, gpu=g) for w in range(9) for g in ("GPU-a", "GPU-b")]
    ledger.ingest_usage(records, received_at=NOW)
    assert ledger.rate_pending(NOW) == 18
    meter = ledger.get_meter("m1")
    assert meter.quantity_rated == 180 and meter.seq >= 3
    keys = [e.key for e in ledger.entries("acct")]
    assert keys == [f"meter:m1:{n}" for n in range(1, meter.seq + 1)]
    assert ledger.balance("acct") == -meter.posted_minor == ledger.entries_sum("acct")
    assert ledger.unrated_usage() == []


_record = st.tuples(
    st.integers(0, 60),  # start, in seconds after T0
    st.integers(1, 10),  # length
    st.sampled_from(["pod-1", "pod-2", "stray"]),
    st.sampled_from(["GPU-a", "GPU-b"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batches=st.lists(st.lists(_record, max_size=6), min_size=1, max_size=4),
    close_s=st.integers(0, 60),
    open_s=st.integers(0, 30),
    rate_every=st.booleans(),
)
def test_property_rate_at_ingest_equals_rating_after(
    batches: list[list[tuple[int, int, str, str]]], close_s: int, open_s: int, rate_every: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fast, slow = (open_ledger(f"sqlite:///{tmp}/{n}.db") for n in ("fast", "slow"))
        for lg in (fast, slow):
            _setup(lg, close_s, open_s)
        for batch in batches:
            records: list[UsageRecord] = [
                gpu_record(T0_S + s, n, pod_uid=p, gpu=g) for s, n, p, g in batch
            ]
            a = fast.ingest_usage(records, received_at=NOW, rate_at=T0 + timedelta(seconds=40))
            b = slow.ingest_usage(records, received_at=NOW)
            assert a == b
            if rate_every:
                fast.rate_pending(T0 + timedelta(seconds=40))
                slow.rate_pending(T0 + timedelta(seconds=40))
        for lg in (fast, slow):
            lg.rate_pending(NOW)
        assert _outcome(fast) == _outcome(slow)
        fast.close()
        slow.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batches=st.lists(st.lists(_record, max_size=6), min_size=1, max_size=4),
    close_s=st.integers(0, 60),
    open_s=st.integers(0, 30),
)
def test_property_batches_in_one_transaction_equal_one_by_one(
    batches: list[list[tuple[int, int, str, str]]], close_s: int, open_s: int
) -> None:
    """Group commit (ingest_batches): each batch gets what it would have got alone after
    the ones before it (duplicates, overlaps across batches), and the charges are the
    same."""
    rate_at = T0 + timedelta(seconds=40)
    with tempfile.TemporaryDirectory() as tmp:
        grouped, single = (open_ledger(f"sqlite:///{tmp}/{n}.db") for n in ("group", "one"))
        for lg in (grouped, single):
            _setup(lg, close_s, open_s)
        records = [
            [gpu_record(T0_S + s, n, pod_uid=p, gpu=g) for s, n, p, g in batch] for batch in batches
        ]
        together = grouped.ingest_batches(records, received_at=NOW, rate_at=rate_at)
        alone = [single.ingest_usage(b, received_at=NOW, rate_at=rate_at) for b in records]
        assert together == alone
        for lg in (grouped, single):
            lg.rate_pending(NOW)
        assert _outcome(grouped) == _outcome(single)
        grouped.close()
        single.close()
