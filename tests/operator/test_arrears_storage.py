"""CloudDisk and Image: data folders, ledger meters on the agent's volume ids, image
copies, and deletion after the arrears retention period (real files, real ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from gpucloud_operator.storage_items import StorageItems
from opworld import NS, T0, World

from gpucloud.ledger import EntryKind
from gpucloud.usage import UsageKind, UsageRecord


def items(w: World, tmp_path: Path) -> StorageItems:
    cfg = w.cfg.with_overrides({"data_root": str(tmp_path / "data")})
    return StorageItems(w.kube, w.ledger, w.clock, cfg)


def add(w: World, plural: str, name: str, spec: dict) -> dict:
    kind = {"clouddisks": "CloudDisk", "images": "Image"}[plural]
    return w.kube.add_namespaced(
        plural, {"kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}
    )


def status(w: World, plural: str, name: str) -> dict:
    return w.kube.namespaced[(plural, NS, name)].get("status", {})


def test_cloud_disk_meter_rates_the_agents_usage(world: World, tmp_path: Path) -> None:
    w, s = world, items(world, tmp_path)
    w.fund(100_00)
    disk = add(w, "clouddisks", "scratch", {"capacityGi": 100})
    s.reconcile("clouddisks", disk)
    st = status(w, "clouddisks", "scratch")
    assert st["phase"] == "Ready" and st["volumeId"] == f"{NS}/scratch"
    assert (tmp_path / "data/disks" / NS / "scratch").is_dir()
    meter = w.ledger.get_meter(st["meterId"])
    assert (meter.kind, meter.subject, meter.unit, meter.unit_price) == (
        "cloud_disk",
        f"{NS}/scratch",
        "gb_hour",
        Decimal("0.0003"),
    )
    # the agent reports 100 GiB used for 10 hours: 1000 GiB-hours x 0.0003 = 0.30 CNY
    records = [
        UsageRecord(
            kind=UsageKind.CLOUD_DISK,
            volume=f"{NS}/scratch",  # the agent's volume id
            node="gpu-l40s-0",
            start=int((T0 + timedelta(hours=h)).timestamp()),
            end=int((T0 + timedelta(hours=h + 1)).timestamp()),
            quantity=100 * 2**30,
        )
        for h in range(10)
    ]
    w.ledger.ingest_usage(records, received_at=T0 + timedelta(hours=10))
    w.ledger.rate_pending(T0 + timedelta(hours=10))
    assert w.ledger.balance("acme") == 100_00 - 30
    # deleting the object closes the meter and removes the data
    w.clock.advance(timedelta(hours=10))
    s.delete("clouddisks", w.kube.namespaced[("clouddisks", NS, "scratch")])
    assert w.ledger.get_meter(st["meterId"]).closed_at == T0 + timedelta(hours=10)
    assert not (tmp_path / "data/disks" / NS / "scratch").exists()


def test_image_copies_the_instance_data_and_is_deleted_after_arrears(
    world: World, tmp_path: Path
) -> None:
    w, s = world, items(world, tmp_path)
    w.fund(10_00)
    w.instance("job", "NVIDIA-L40S")
    src = tmp_path / "data/instances" / NS / "job"
    (src / "ckpt").mkdir(parents=True)
    (src / "ckpt/model.pt").write_bytes(b"w" * 50_000)
    img = add(w, "images", "job-backup", {"sourceInstance": "job"})
    s.reconcile("images", img)
    st = status(w, "images", "job-backup")
    copy = tmp_path / "data/images" / NS / "job-backup"
    assert st["phase"] == "Ready" and (copy / "ckpt/model.pt").read_bytes() == b"w" * 50_000
    assert st["usedBytes"] >= 50_000 and "ImageCreated" in w.kube.reasons("job-backup")
    assert w.ledger.get_meter(st["meterId"]).kind == "image"
    (src / "ckpt/model.pt").write_bytes(b"changed")  # a copy, not a link
    assert (copy / "ckpt/model.pt").read_bytes() == b"w" * 50_000
    missing = add(w, "images", "nothing", {"sourceInstance": "ghost"})
    s.reconcile("images", missing)
    assert status(w, "images", "nothing")["phase"] == "Failed"
    assert "spec.sourceInstance" in status(w, "images", "nothing")["message"]
    # arrears for 7 days: the image goes, with an event and an audit record
    since = T0 + timedelta(hours=1)
    acct = w.kube.cluster[("accounts", "acme")]
    acct["status"] = {
        "state": "Arrears",
        "arrearsSince": "2026-01-01T01:00:00Z",
        "dataDeletionAt": "2026-01-08T01:00:00Z",
    }
    w.ledger.post_entry("acme", EntryKind.CHARGE, -20_00, "debt", at=since)
    w.clock.set(since + timedelta(days=7) - timedelta(seconds=1))
    s.reconcile("images", w.kube.namespaced[("images", NS, "job-backup")])
    assert copy.exists()
    w.clock.set(datetime(2026, 1, 8, 1, 5, tzinfo=UTC))
    s.reconcile("images", w.kube.namespaced[("images", NS, "job-backup")])
    st = status(w, "images", "job-backup")
    assert st["phase"] == "Deleted" and not copy.exists() and st["usedBytes"] == 0
    assert w.ledger.get_meter(st["meterId"]).closed_at == since + timedelta(days=7)
    assert "DataDeleted" in w.kube.reasons("job-backup")
    audit = [a for a in w.ledger.audit_events("acme") if a.action == "data.deleted"]
    assert [a.subject for a in audit] == [f"image:{NS}/job-backup"]
    assert not [e for e in w.ledger.entries("acme") if e.kind is EntryKind.ADJUSTMENT]


def test_a_stale_arrears_status_never_deletes_paid_data(world: World, tmp_path: Path) -> None:
    """The Account's status lags the ledger: a recharge it has not seen yet saves the data."""
    w, s = world, items(world, tmp_path)
    w.fund(10_00)
    disk = add(w, "clouddisks", "scratch", {"capacityGi": 1})
    s.reconcile("clouddisks", disk)
    w.kube.cluster[("accounts", "acme")]["status"] = {
        "state": "Arrears",
        "arrearsSince": "2026-01-01T00:00:00Z",
        "dataDeletionAt": "2026-01-08T00:00:00Z",
    }
    w.clock.set(T0 + timedelta(days=8))
    s.reconcile("clouddisks", w.kube.namespaced[("clouddisks", NS, "scratch")])
    assert status(w, "clouddisks", "scratch")["phase"] == "Ready"
    assert (tmp_path / "data/disks" / NS / "scratch").is_dir()
