"""Usage ingestion: idempotent on the natural key, no overlapping GPU-seconds."""

from __future__ import annotations

from datetime import timedelta

from ledger_helpers import T0, T0_S, disk_record, gpu_record

from gpucloud.ledger import Ledger
from gpucloud.usage import UsageKind


def test_accepts_then_dedupes_a_replayed_batch(ledger: Ledger) -> None:
    batch = [gpu_record(T0_S + 10 * i, gpu=g) for i in range(50) for g in ("GPU-a", "GPU-b")]
    first = ledger.ingest_usage(batch, received_at=T0)
    assert (first.accepted, first.duplicates, first.rejected) == (100, 0, [])
    again = ledger.ingest_usage(batch, received_at=T0 + timedelta(seconds=5))
    assert (again.accepted, again.duplicates, again.rejected) == (0, 100, [])
    assert len(ledger.unrated_usage()) == 100


def test_same_key_other_content_is_rejected(ledger: Ledger) -> None:
    ledger.ingest_usage([gpu_record(T0_S)], received_at=T0)
    other_pod = gpu_record(T0_S, pod_uid="pod-2")
    result = ledger.ingest_usage([other_pod, gpu_record(T0_S + 10)], received_at=T0)
    assert result.accepted == 1 and result.duplicates == 0
    assert result.rejected == [(0, f"gpu_time:GPU-a:{T0_S}: already ingested with other content")]


def test_overlaps_of_one_gpu_are_rejected_stored_and_in_batch(ledger: Ledger) -> None:
    ledger.ingest_usage([gpu_record(T0_S, 10)], received_at=T0)
    batch = [
        gpu_record(T0_S + 5, 10),  # overlaps the stored [0, 10)
        gpu_record(T0_S - 3, 5),  # overlaps the stored record from before
        gpu_record(T0_S + 10, 10),  # fine: adjacent
        gpu_record(T0_S + 15, 3),  # overlaps the previous one in this batch
        gpu_record(T0_S + 5, 10, gpu="GPU-b"),  # another GPU: fine
        gpu_record(T0_S - 10, 10),  # fine: adjacent before
    ]
    result = ledger.ingest_usage(batch, received_at=T0)
    assert result.accepted == 3
    assert [i for i, _ in result.rejected] == [0, 1, 3]
    assert all("overlaps" in reason for _, reason in result.rejected)
    seconds = {r.subject: 0 for r in ledger.unrated_usage()}
    for r in ledger.unrated_usage():
        seconds[r.subject] += r.end - r.start
    assert seconds == {"GPU-a": 30, "GPU-b": 10}


def test_overlaps_are_found_for_each_of_many_subjects_in_one_batch(ledger: Ledger) -> None:
    """The stored neighbours of a batch's subjects come from one query per 64 subjects:
    each subject is checked against its own records only, past the first chunk too."""
    gpus = [f"GPU-{i:03d}" for i in range(150)]
    ledger.ingest_usage([gpu_record(T0_S + 10 * (i % 3), gpu=g) for i, g in enumerate(gpus)],
                        received_at=T0)  # fmt: skip
    batch = [gpu_record(T0_S + 10 * (i % 3) + 5, gpu=g) for i, g in enumerate(gpus)]  # overlaps
    batch += [gpu_record(T0_S + 10 * (i % 3) + 10, gpu=g) for i, g in enumerate(gpus)]  # next
    batch += [gpu_record(T0_S + 10 * (i % 3), gpu=g) for i, g in enumerate(gpus)]  # replays
    result = ledger.ingest_usage(batch, received_at=T0)
    assert (result.accepted, result.duplicates) == (150, 150)
    assert [i for i, _ in result.rejected] == list(range(150))
    assert all(f"{gpus[i]}:" in reason and "overlaps" in reason for i, reason in result.rejected)
    assert len(ledger.unrated_usage(limit=1000)) == 300


def test_in_batch_duplicate_and_conflict(ledger: Ledger) -> None:
    rec = gpu_record(T0_S)
    result = ledger.ingest_usage([rec, rec, gpu_record(T0_S, pod_uid="other")], received_at=T0)
    assert (result.accepted, result.duplicates) == (1, 1)
    assert result.rejected[0][0] == 2 and "other content" in result.rejected[0][1]


def test_volume_records_never_overlap_either(ledger: Ledger) -> None:
    gib = 2**30
    first = ledger.ingest_usage([disk_record(T0_S, 3600, gib)], received_at=T0)
    assert first.accepted == 1
    result = ledger.ingest_usage(
        [disk_record(T0_S + 1800, 3600, gib), disk_record(T0_S + 3600, 3600, 2 * gib)],
        received_at=T0,
    )
    assert result.accepted == 1 and [i for i, _ in result.rejected] == [0]


def test_non_records_are_rejected_by_index(ledger: Ledger) -> None:
    result = ledger.ingest_usage([gpu_record(T0_S), {"kind": "gpu_time"}], received_at=T0)  # type: ignore[list-item]
    assert result.accepted == 1 and result.rejected[0][0] == 1
    assert "not a UsageRecord" in result.rejected[0][1]
    assert ledger.ingest_usage([], received_at=T0).accepted == 0


def test_usage_summary_by_resource_namespace_kind_and_time(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.open_meter(
        "m1",
        account="alice",
        resource="team-a/inst-1",
        kind="gpu_time",
        subject="pod-1",
        unit_price="1",
        unit="gpu_hour",
        opened_at=T0,
    )
    gib = 2**30
    ledger.ingest_usage(
        [gpu_record(T0_S + 10 * i) for i in range(6)]
        + [gpu_record(T0_S, pod_uid="pod-9", gpu="GPU-z", namespace="team-b")]
        + [disk_record(T0_S, 3600, 3 * gib)],
        received_at=T0,
    )
    ledger.rate_pending(T0 + timedelta(hours=2))
    rows = {(r.resource, r.kind): r for r in ledger.usage_summary()}
    assert rows[("team-a/inst-1", "gpu_time")].gpu_seconds == 60
    assert rows[(None, "gpu_time")].gpu_seconds == 10
    assert rows[(None, "cloud_disk")].byte_seconds == 3 * gib * 3600
    assert [r.gpu_seconds for r in ledger.usage_summary(account="alice")] == [60]
    assert [r.gpu_seconds for r in ledger.usage_summary(namespace="team-b")] == [10]
    assert [r.kind for r in ledger.usage_summary(kind=UsageKind.CLOUD_DISK)] == ["cloud_disk"]
    since = ledger.usage_summary(account="alice", since=T0 + timedelta(seconds=30))
    assert since[0].gpu_seconds == 30
    until = ledger.usage_summary(account="alice", until=T0 + timedelta(seconds=30))
    assert until[0].gpu_seconds == 30


def test_gpu_activity_is_read_by_meter_and_only_for_what_it_admitted(ledger: Ledger) -> None:
    """A run's records with their activity, by its meter: the windows it rated, after
    ``since_s``, oldest first; the same pod reported from another node is refused and
    never read; rating later (rate_pending) keeps the activity of a record."""
    from datetime import timedelta
    from decimal import Decimal

    from ledger_helpers import T0, T0_S, gpu_record

    from gpucloud.ledger import GpuActivity
    from gpucloud.usage import Activity

    ledger.ensure_account("acct")
    ledger.open_meter(
        "m1", account="acct", resource="r/pod-1", kind="gpu_time", subject="pod-1",
        unit_price=Decimal("19.80"), unit="gpu_hour", opened_at=T0, gpus=1, node="node-1",
    )  # fmt: skip

    def busy(util: int, samples: int = 10) -> Activity:
        return Activity(util_max_percent=util, memory_max_bytes=util * 2**20, samples=samples)

    now = T0 + timedelta(seconds=60)
    rated_now = [gpu_record(T0_S, activity=busy(0)), gpu_record(T0_S + 10, activity=busy(73, 9))]
    forged = gpu_record(T0_S + 20, node="node-2", activity=busy(0))
    result = ledger.ingest_usage([*rated_now, forged], received_at=now, rate_at=now)
    assert [i for i, _ in result.rejected] == [2]
    ledger.ingest_usage([gpu_record(T0_S + 30)], received_at=now)  # old agent, rated later
    ledger.rate_pending(now)
    got = ledger.gpu_activity("m1", since_s=T0_S)
    assert got == [
        GpuActivity("GPU-a", T0_S, T0_S + 10, 0, 0, 10),
        GpuActivity("GPU-a", T0_S + 10, T0_S + 20, 73, 73 * 2**20, 9),
        GpuActivity("GPU-a", T0_S + 30, T0_S + 40, None, None, None),
    ]
    assert ledger.gpu_activity("m1", since_s=T0_S + 20) == got[2:]
    assert ledger.gpu_activity("other", since_s=0) == []
