"""CloudDisk and Image: data folders, ledger meters on the agent's volume ids, image
copies, and deletion after the arrears retention period (real files, real ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from gpucloud_agent.imagecopy import make_image
from gpucloud_agent.wipe import WIPE_FOLDERS, remove, resolve
from gpucloud_operator.builders import NOTICE_DIR
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


def agent_round(w: World, root: Path, node: str) -> None:
    """What the agent of ``node`` does in one round: its copies, then its wipes."""
    for c in w.ledger.pending_image_copies(node):
        w.ledger.complete_image_copy(c.id, node, make_image(root, c.source, c.path), w.clock.now())
    for wipe in w.ledger.pending_wipes(node):
        freed = remove(resolve(root, wipe.path, WIPE_FOLDERS)) or 0
        w.ledger.complete_wipe(wipe.id, node, freed, w.clock.now())


def test_image_is_copied_by_its_nodes_agent_and_deleted_after_arrears(
    world: World, tmp_path: Path
) -> None:
    w, s = world, items(world, tmp_path)
    root = tmp_path / "data"
    w.fund(10_00)
    w.instance("job", "NVIDIA-L40S")
    w.tick("job")
    node = w.status("job")["volumeNode"]
    src = root / "instances" / NS / "job"
    (src / "ckpt").mkdir(parents=True)
    (src / "ckpt/model.pt").write_bytes(b"w" * 50_000)
    img = add(w, "images", "job-backup", {"sourceInstance": "job"})
    s.reconcile("images", img)
    # not the operator's to copy: a copy for the node holding the data, Creating until done
    st = status(w, "images", "job-backup")
    copy = root / "images" / NS / "job-backup"
    assert st["phase"] == "Creating" and st["node"] == node and not copy.exists()
    assert "meterId" not in st and not [m for m in w.ledger.meters("acme") if m.kind == "image"]
    (job,) = w.ledger.pending_image_copies(node)
    assert (job.source, job.path) == (f"instances/{NS}/job", f"images/{NS}/job-backup")
    w.clock.advance(timedelta(seconds=90))
    copied_at = w.clock.now()
    agent_round(w, root, node)
    w.clock.advance(timedelta(seconds=30))
    s.reconcile("images", w.kube.namespaced[("images", NS, "job-backup")])
    st = status(w, "images", "job-backup")
    made = w.ledger.get_image_copy(job.subject)
    assert made is not None and made.bytes_used is not None
    assert st["phase"] == "Ready" and (copy / "ckpt/model.pt").read_bytes() == b"w" * 50_000
    assert st["usedBytes"] == made.bytes_used >= 50_000  # the agent's measurement
    assert st["billedSince"] == st["readyAt"] == copied_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "ImageCreated" in w.kube.reasons("job-backup")
    meter = w.ledger.get_meter(st["meterId"])
    assert (meter.kind, meter.opened_at) == ("image", copied_at)
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
    assert st["phase"] == "Deleted" and st["usedBytes"] == 0
    assert w.ledger.get_meter(st["meterId"]).closed_at == since + timedelta(days=7)
    assert "DataDeleted" in w.kube.reasons("job-backup")
    # the folder is on the node: its agent removes it
    (wipe,) = w.ledger.pending_wipes(node)
    assert wipe.path == f"images/{NS}/job-backup" and copy.exists()
    agent_round(w, root, node)
    assert not copy.exists() and src.exists()
    audit = [a for a in w.ledger.audit_events("acme") if a.action == "data.deleted"]
    assert [a.subject for a in audit] == [f"image:{NS}/job-backup"]
    assert audit[0].detail["node"] == node
    assert not [e for e in w.ledger.entries("acme") if e.kind is EntryKind.ADJUSTMENT]


def test_a_deleted_image_cancels_its_copy_and_its_name_waits_for_the_wipe(
    world: World, tmp_path: Path
) -> None:
    w, s = world, items(world, tmp_path)
    root = tmp_path / "data"
    w.fund(10_00)
    w.instance("job", "NVIDIA-L40S")
    w.tick("job")
    node = w.status("job")["volumeNode"]
    (root / "instances" / NS / "job").mkdir(parents=True)
    s.reconcile("images", add(w, "images", "bak", {"sourceInstance": "job"}))
    (job,) = w.ledger.pending_image_copies(node)
    assert s.delete("images", w.kube.namespaced[("images", NS, "bak")])
    cancelled = w.ledger.get_image_copy(job.subject)
    assert cancelled is not None and cancelled.outcome == "cancelled"
    assert w.ledger.pending_image_copies(node) == []
    # a new Image of the same name waits until the old folder's wipe is done
    del w.kube.namespaced[("images", NS, "bak")]
    s.reconcile("images", add(w, "images", "bak", {"sourceInstance": "job"}))
    st = status(w, "images", "bak")
    assert st["phase"] == "Creating" and "remove the folder of a deleted image" in st["message"]
    assert w.ledger.pending_image_copies(node) == []
    agent_round(w, root, node)
    s.reconcile("images", w.kube.namespaced[("images", NS, "bak")])
    assert len(w.ledger.pending_image_copies(node)) == 1


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


def test_disk_volume_claim_and_attachment_rules(world: World, tmp_path: Path) -> None:
    """A disk gets a ReadWriteMany volume + claim; an instance attaching it starts only once
    it exists and is Ready (refusals name spec.cloudDisks[i], nothing charged), mounts it,
    and holds the disk's deletion while it is active."""
    w, s = world, items(world, tmp_path)
    w.fund(100_00)
    inst = w.instance("job", "NVIDIA-L40S")
    w.kube.update_spec("gpuinstances", NS, "job", {"cloudDisks": ["other", "scratch"]})
    other = add(w, "clouddisks", "other", {"capacityGi": 5})
    s.reconcile("clouddisks", other)
    w.tick()
    st = w.status("job")
    assert st["phase"] == "Refused" and not w.kube.pods
    assert st["message"].startswith("spec.cloudDisks[1]: CloudDisk 'scratch' does not exist")
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "CloudDiskNotFound")
    assert w.kube.reasons("job").count("CloudDiskNotFound") == 1
    # created but not reconciled yet: not Ready
    disk = add(w, "clouddisks", "scratch", {"capacityGi": 10})
    w.tick()
    assert w.status("job")["message"].startswith("spec.cloudDisks[1]: CloudDisk 'scratch' is not")
    # being deleted: refused too
    w.kube.namespaced[("clouddisks", NS, "scratch")]["metadata"]["deletionTimestamp"] = "x"
    w.tick()
    assert "CloudDiskDeleting" in w.kube.reasons("job")
    del w.kube.namespaced[("clouddisks", NS, "scratch")]["metadata"]["deletionTimestamp"]
    # nothing charged: no GPU meter, no package, no storage
    assert w.ledger.balance("acme") == 100_00
    assert [m.kind for m in w.ledger.meters("acme")] == ["cloud_disk"]  # the other disk's
    # Ready: a hostPath volume of the shared data root, a claim bound to it
    s.reconcile("clouddisks", disk)
    dst = status(w, "clouddisks", "scratch")
    assert dst["phase"] == "Ready" and dst["claimName"] == "scratch-clouddisk"
    pv = w.kube.pvs[f"gpucloud-disk-{disk['metadata']['uid']}"]
    assert pv["spec"]["hostPath"]["path"] == str(tmp_path / "data/disks" / NS / "scratch")
    assert pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert w.kube.pvcs[(NS, "scratch-clouddisk")]["spec"]["volumeName"] == pv["metadata"]["name"]
    w.tick()
    assert w.status("job")["phase"] == "Running"
    pod = w.kube.pods[(NS, "job-gpu")]
    vols = pod["spec"]["volumes"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in vols if "persistentVolumeClaim" in v]
    assert claims == ["job-data", "other-clouddisk", "scratch-clouddisk"]
    mounts = [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
    assert mounts == ["/root/data", "/root/disks/other", "/root/disks/scratch", NOTICE_DIR]
    # deleting the disk while the instance runs is held, with a condition and one event
    held = w.kube.namespaced[("clouddisks", NS, "scratch")]
    assert s.delete("clouddisks", held) is False
    assert s.delete("clouddisks", held) is False
    cond = {c["type"]: c for c in status(w, "clouddisks", "scratch")["conditions"]}
    assert cond["DeletionHeld"]["status"] == "True" and cond["DeletionHeld"]["reason"] == "InUse"
    assert f"{NS}/job" in cond["DeletionHeld"]["message"]
    assert w.kube.reasons("scratch").count("DeletionHeld") == 1
    assert (
        pv["metadata"]["name"] in w.kube.pvs and (tmp_path / "data/disks" / NS / "scratch").is_dir()
    )
    # detached from the spec but still mounted by the running pod: still held
    w.kube.update_spec("gpuinstances", NS, "job", {"cloudDisks": ["other"]})
    assert s.users(held) == ["job"]
    w.kube.update_spec("gpuinstances", NS, "job", {"state": "Stopped"})
    w.tick()
    assert w.status("job")["phase"] == "Stopped" and not w.kube.pods
    assert s.delete("clouddisks", held) is True
    assert pv["metadata"]["name"] not in w.kube.pvs and (NS, "scratch-clouddisk") not in w.kube.pvcs
    assert not (tmp_path / "data/disks" / NS / "scratch").exists()
    assert inst["metadata"]["uid"] == w.kube.instance(NS, "job")["metadata"]["uid"]


def test_shared_storage_disks_are_metered_and_wiped_by_the_storage_meter(
    world: World, tmp_path: Path
) -> None:
    """With a shared-storage meter (the chart's cloudDisks), a disk's meter is bound to
    that reporter: a node agent that sees the same shared folder is refused; and a deleted
    disk's folder is removed by the meter (a wipe), not by the operator."""
    w = world
    cfg = w.cfg.with_overrides(
        {"data_root": str(tmp_path / "data"), "disk_meter_node": "gpucloud-shared-storage"}
    )
    s = StorageItems(w.kube, w.ledger, w.clock, cfg)
    w.fund(100_00)
    s.reconcile("clouddisks", add(w, "clouddisks", "scratch", {"capacityGi": 100}))
    st = status(w, "clouddisks", "scratch")
    assert w.ledger.get_meter(st["meterId"]).node == "gpucloud-shared-storage"

    def hour(node: str) -> UsageRecord:
        return UsageRecord(
            kind=UsageKind.CLOUD_DISK, volume=f"{NS}/scratch", node=node,
            start=int(T0.timestamp()), end=int(T0.timestamp()) + 3600, quantity=100 * 2**30,
        )  # fmt: skip

    refused = w.ledger.ingest_usage([hour("gpu-l40s-0")], received_at=T0 + timedelta(hours=1))
    assert refused.rules == {0: "wrong_node"}
    w.ledger.ingest_usage([hour("gpucloud-shared-storage")], received_at=T0 + timedelta(hours=1))
    w.ledger.rate_pending(T0 + timedelta(hours=1))
    assert w.ledger.balance("acme") == 100_00 - 3  # 100 GiB-hours x 0.0003 = 0.03
    folder = tmp_path / "data/disks" / NS / "scratch"
    (folder / "f").write_bytes(b"x" * 10_000)
    w.clock.advance(timedelta(hours=1))
    s.delete("clouddisks", w.kube.namespaced[("clouddisks", NS, "scratch")])
    assert folder.exists()  # the operator leaves it to the meter
    (wipe,) = w.ledger.pending_wipes("gpucloud-shared-storage")
    assert wipe.path == f"disks/{NS}/scratch"
    freed = remove(resolve(tmp_path / "data", wipe.path, ("disks",))) or 0
    w.ledger.complete_wipe(wipe.id, "gpucloud-shared-storage", freed, w.clock.now())
    assert not folder.exists() and freed >= 10_000
