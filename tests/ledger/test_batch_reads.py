"""The batch reads of the operator's accruedCost refresh give what the single-item reads
give, item by item: ``charges_by_resources`` / ``charges_by_resource``, ``get_meters`` /
``get_meter``, ``gpus_seen_by_pod`` / ``gpus_seen``."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from ledger_helpers import T0, T0_S, gpu_record

from gpucloud.ledger import Ledger, NotFound, entries


def _meter(
    ledger: Ledger, meter_id: str, account: str, resource: str, pod: str, gpus: int = 1
) -> None:
    ledger.open_meter(
        meter_id, account=account, resource=resource, kind="gpu_time", subject=pod,
        unit_price=Decimal("19.80"), unit="gpu_hour", opened_at=T0, gpus=gpus, node="node-1",
    )  # fmt: skip


def test_charges_by_resources_match_the_single_reads(ledger: Ledger) -> None:
    for acct in ("alice", "bob"):
        ledger.ensure_account(acct)
    at = T0
    ledger.post_entry("alice", "charge", -1980, "k1", resource="a/nb1", at=at)
    ledger.post_entry("alice", "charge", -7, "k2", resource="a/nb1", at=at)
    ledger.post_entry("alice", "refund", 500, "k3", resource="a/nb1", at=at)  # not a charge
    ledger.post_entry("alice", "charge", -3, "k4", resource="shared", at=at)
    ledger.post_entry("bob", "charge", -11, "k5", resource="shared", at=at)
    ledger.post_entry("bob", "recharge", 10_000, "k6", at=at)
    pairs = [
        ("alice", "a/nb1"),
        ("alice", "shared"),
        ("bob", "shared"),
        ("bob", "a/nb1"),  # a cross pair of the IN lists: bob has none of it
        ("alice", "a/none"),
        ("nobody", "a/nb1"),  # an account the ledger does not know: absent, no error
    ]
    got = ledger.charges_by_resources(pairs)
    assert got == {("alice", "a/nb1"): 1987, ("alice", "shared"): 3, ("bob", "shared"): 11}
    for acct, res in pairs[:5]:
        assert got.get((acct, res), 0) == ledger.charges_by_resource(acct).get(res, 0)
    assert ledger.charges_by_resources([]) == {}


def test_charges_by_resources_over_several_chunks(ledger: Ledger, monkeypatch) -> None:
    monkeypatch.setattr(entries, "BATCH", 2)  # 5 pairs: three queries
    ledger.ensure_account("alice")
    for i in range(5):
        ledger.post_entry("alice", "charge", -(i + 1), f"k{i}", resource=f"a/nb{i}", at=T0)
    got = ledger.charges_by_resources(("alice", f"a/nb{i}") for i in range(5))
    assert got == {("alice", f"a/nb{i}"): i + 1 for i in range(5)}


def test_get_meters_match_get_meter(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.ensure_account("bob")
    _meter(ledger, "m1", "alice", "a/nb1", "pod-1")
    _meter(ledger, "m2", "bob", "b/nb2", "pod-2")
    ledger.close_meter("m2", T0 + timedelta(seconds=61))
    got = ledger.get_meters(["m1", "m2", "m-unknown", "m1"])
    assert set(got) == {"m1", "m2"}
    for mid in ("m1", "m2"):
        assert got[mid] == ledger.get_meter(mid)
    assert got["m2"].account == "bob" and got["m2"].closed_at is not None
    try:
        ledger.get_meter("m-unknown")
    except NotFound:
        pass
    else:  # pragma: no cover
        raise AssertionError("the single read says NotFound; the batch leaves it out")


def test_gpus_seen_by_pod_match_gpus_seen(ledger: Ledger) -> None:
    assert ledger.usage_watermark() == 0
    ledger.ensure_account("alice")
    _meter(ledger, "m1", "alice", "a/nb1", "pod-1", gpus=2)
    now = T0 + timedelta(seconds=300)
    ledger.ingest_usage(  # pod-1's rated by its meter; pod-2 has none: unrated
        [gpu_record(T0_S, gpu="GPU-b"), gpu_record(T0_S, gpu="GPU-x", pod_uid="pod-2")],
        received_at=now,
        rate_at=now,
    )
    # not rated on arrival (no rate_at): found through the unrated index
    ledger.ingest_usage([gpu_record(T0_S + 100, gpu="GPU-a")], received_at=now)
    mark = ledger.usage_watermark()
    assert mark > 0
    ledger.ingest_usage([gpu_record(T0_S + 10, gpu="GPU-b")], received_at=now)
    assert ledger.usage_watermark() > mark  # a record stored since: it moved
    pods = ["pod-1", "pod-2", "pod-3"]
    got = ledger.gpus_seen_by_pod(pods)
    assert got == {"pod-1": ["GPU-a", "GPU-b"], "pod-2": ["GPU-x"]}
    for pod in pods:
        assert got.get(pod, []) == ledger.gpus_seen(pod)
