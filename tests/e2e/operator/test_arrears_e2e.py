"""Arrears end to end: the operator process on the test bed, a real SQLite ledger, a file
clock, real data folders and a real webhook server. A funded account runs an instance
into arrears: warning, shutdown at the arrears instant, only storage billed after it,
deletion of instance storage, cloud disk and image exactly at day 7; a recharge on
day 6 that saves the data; a package shut down by arrears refunding its unused term; and
a cloud disk mounted into an instance pod through a Bound ReadWriteMany claim."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from opharness import Harness, node_agent

from gpucloud.billing import to_minor
from gpucloud.ledger import EntryKind
from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import Testbed
from gpucloud.testing.webhook import Hook

pytestmark = pytest.mark.e2e

L40S = "NVIDIA-L40S"
WEEK = timedelta(days=7)


@pytest.fixture
def arrears(testbed: Testbed, namespace: str, tmp_path: Path, hook: Hook) -> Iterator[Harness]:
    h = Harness(
        testbed,
        namespace,
        tmp_path,
        data_root=tmp_path / "data",
        storage_interval_s=0.5,
        webhook_url=hook.url,
    )
    h.setup()
    yield h
    h.close()


def account(h: Harness) -> dict[str, Any]:
    return get_json(h.tb, "account", h.account)


def acct_status(h: Harness) -> dict[str, Any]:
    return account(h).get("status") or {}


def item(h: Harness, kind: str, name: str) -> dict[str, Any]:
    return get_json(h.tb, kind, name, "-n", h.ns).get("status") or {}


def run_into_arrears(h: Harness, hook: Hook) -> tuple[Path, str]:
    """Fund two hours of an L40S (5.20/h GPU + 50 GiB x 0.0004/h storage = 5.22/h), add a
    cloud disk and an image, and let the money run out."""
    h.fund(10_44)
    h.start()
    h.instance("job", L40S)
    h.wait_phase("job", "Running")
    data = h.tmp / "data/instances" / h.ns / "job"
    (data / "ckpt").mkdir(parents=True)
    (data / "ckpt/model.pt").write_bytes(b"w" * 100_000)
    h.tb.apply(
        [
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "CloudDisk",
                "metadata": {"name": "scratch", "namespace": h.ns},
                "spec": {"capacityGi": 10},
            },
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "Image",
                "metadata": {"name": "job-backup", "namespace": h.ns},
                "spec": {"sourceInstance": "job"},
            },
        ]
    )
    # the node holding the instance's data makes the image: its agent, started for that
    with node_agent(h, h.status("job")["volumeNode"]):
        h.wait(lambda: item(h, "image", "job-backup").get("phase") == "Ready", "the image")
    h.wait(lambda: item(h, "clouddisk", "scratch").get("phase") == "Ready", "the cloud disk")
    assert (h.tmp / "data/images" / h.ns / "job-backup/ckpt/model.pt").stat().st_size == 100_000
    # 2 h left < 24 h: warned once, by event, condition and webhook
    h.wait(lambda: acct_status(h).get("state") == "LowBalance", "the low-balance state")
    h.wait(lambda: any(m["type"] == "LowBalanceWarning" for m in hook.received), "the webhook")
    conds = {c["type"]: c["status"] for c in acct_status(h)["conditions"]}
    assert conds["LowBalanceWarning"] == "True"
    h.advance(2 * 3600 + 60)
    st = h.wait(lambda: acct_status(h).get("state") == "Arrears" and acct_status(h), "arrears")
    since = st["arrearsSince"]
    assert since == (h.clock.now()).strftime("%Y-%m-%dT%H:%M:%SZ")
    inst = h.wait_phase("job", "Stopped")
    assert inst["stoppedAt"] == since and "ArrearsShutdown" in h.events("job")
    h.wait(lambda: h.pod("job") is None, "the pod to go")
    assert h.tb.kubectl("get", "pvc", "job-data", "-n", h.ns, check=False).returncode == 0
    h.wait(lambda: any(m["type"] == "Arrears" for m in hook.received), "the arrears webhook")
    return data, since


def test_arrears_shutdown_then_deletion_exactly_at_day_7(arrears: Harness, hook: Hook) -> None:
    h = arrears
    data, _since = run_into_arrears(h, hook)
    arrears_at = h.clock.now()
    (gpu_meter,) = [m for m in h.ledger.meters(h.account) if m.kind == "gpu_time"]
    started = gpu_meter.opened_at
    h.advance(61)  # the GPU run is settled from control-plane timestamps, to the arrears
    h.wait(lambda: h.entries("meter-fallback:"), "the GPU settlement")
    gpu = sum(-e.amount_minor for e in h.entries("meter-fallback:"))
    assert gpu == to_minor(Decimal("5.20") * int((arrears_at - started).total_seconds()) / 3600)
    # day 7 minus one second: a pass has run (storage settled to that hour), data is there
    deletion = arrears_at + WEEK
    assert acct_status(h)["dataDeletionAt"] == deletion.strftime("%Y-%m-%dT%H:%M:%SZ")
    h.clock.set(deletion - timedelta(seconds=1))
    hour = (deletion - timedelta(seconds=1)).replace(minute=0, second=0)
    h.wait(
        lambda: h.status("job").get("storageBilledUntil") == hour.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "storage settled up to day 7",
    )
    assert data.exists() and item(h, "image", "job-backup")["phase"] == "Ready"
    after = [e for e in h.ledger.entries(h.account, limit=10_000) if e.at > arrears_at]
    assert after and {e.key.split(":")[0] for e in after} <= {"storage", "meter-fallback"}
    # exactly day 7: everything goes, with an event each and an audit record each; the
    # instance folder is node-local, removed by the agent of its node
    node = h.status("job")["volumeNode"]
    h.clock.set(deletion)
    h.wait(lambda: item(h, "image", "job-backup").get("phase") == "Deleted", "image deletion")
    h.wait(lambda: item(h, "clouddisk", "scratch").get("phase") == "Deleted", "disk deletion")
    wipe = h.wait(lambda: h.ledger.get_wipe(wipe_subject(h)), "the wipe request")
    assert (wipe.node, wipe.path) == (node, f"instances/{h.ns}/job")
    cond = h.wait(lambda: data_deleted(h), "the WipePending condition")
    assert (cond["status"], cond["reason"]) == ("False", "WipePending")
    assert data.exists() and "DataDeleted" not in h.events("job")  # no agent yet
    with node_agent(h, node):
        h.wait(lambda: "DataDeleted" in h.events("job"), "instance storage deletion")
        image = h.tmp / "data/images" / h.ns / "job-backup"
        h.wait(lambda: not image.exists(), "the agent to remove the image folder")
    cond = data_deleted(h)
    assert cond is not None and cond["status"] == "True"
    done = h.ledger.get_wipe(wipe_subject(h))
    assert done is not None and done.bytes_freed is not None and done.bytes_freed >= 100_000
    assert f"{done.bytes_freed} bytes freed on node {node}" in cond["message"]
    assert not data.exists() and not (h.tmp / "data/images" / h.ns / "job-backup").exists()
    assert not (h.tmp / "data/disks" / h.ns / "scratch").exists()
    h.wait(
        lambda: h.tb.kubectl("get", "pvc", "job-data", "-n", h.ns, check=False).returncode != 0,
        "the claim to go",
    )
    audit = {
        a.subject: a.at for a in h.ledger.audit_events(h.account) if a.action == "data.deleted"
    }
    assert set(audit) == {
        f"instance:{h.ns}/job",
        f"image:{h.ns}/job-backup",
        f"cloud_disk:{h.ns}/scratch",
    }
    assert set(audit.values()) == {deletion}


def wipe_subject(h: Harness) -> str:
    st = h.get("job")
    return f"instance-volume:{st['metadata']['uid']}:{st['status']['runs']}"


def data_deleted(h: Harness) -> dict[str, Any] | None:
    conds = h.status("job").get("conditions") or []
    return next((c for c in conds if c["type"] == "DataDeleted"), None)


def test_recharge_on_day_6_saves_the_data(arrears: Harness, hook: Hook) -> None:
    h = arrears
    data, since = run_into_arrears(h, hook)
    deletion = h.clock.now() + WEEK
    h.advance(6 * 24 * 3600)
    h.wait(lambda: h.status("job").get("storageBilledUntil", "") > since, "storage billing")
    debt = -h.ledger.balance(h.account)
    assert debt > 0
    h.ledger.post_entry(
        h.account, EntryKind.RECHARGE, debt + 100_00, f"{h.ns}:day6", at=h.clock.now()
    )
    h.wait(lambda: acct_status(h).get("state") != "Arrears", "arrears to end")
    assert "dataDeletionAt" not in acct_status(h)
    h.wait(lambda: any(m["type"] == "ArrearsCleared" for m in hook.received), "the webhook")
    h.clock.set(deletion + timedelta(hours=1))
    hour = deletion.replace(minute=0, second=0) + timedelta(hours=1)
    try:
        h.wait(
            lambda: (
                h.status("job").get("storageBilledUntil") == hour.strftime("%Y-%m-%dT%H:%M:%SZ")
            ),
            "a pass after the old deletion date",
            timeout=20,
        )
    except AssertionError:
        raise AssertionError((hour, h.clock.now(), h.status("job"), acct_status(h))) from None
    assert (data / "ckpt/model.pt").exists() and "DataDeleted" not in h.events("job")
    assert item(h, "image", "job-backup")["phase"] == "Ready"
    assert h.status("job")["phase"] == "Stopped"  # until the user starts it again
    h.patch_spec("job", {"state": "Stopped"})
    h.patch_spec("job", {"state": "Running"})
    h.wait_phase("job", "Running")


def disk_users(h: Harness) -> dict[str, Any]:
    return {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": "job", "namespace": h.ns},
        "spec": {
            "gpu": {"product": L40S, "count": 1},
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": 50},
            "state": "Running",
            "cloudDisks": ["scratch"],
        },
    }


def test_cloud_disk_is_a_bound_claim_mounted_into_the_pod(arrears: Harness) -> None:
    """A missing disk refuses the start (nothing charged); once the disk is Ready its
    ReadWriteMany claim is Bound and the pod mounts it; deleting it waits for the stop."""
    h = arrears
    h.fund(100_00)
    h.start()
    h.tb.apply([disk_users(h)])
    st = h.wait_phase("job", "Refused")
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["reason"] == "CloudDiskNotFound"
    assert ready["message"].startswith("spec.cloudDisks[0]: CloudDisk 'scratch' does not exist")
    h.wait(lambda: "CloudDiskNotFound" in h.events("job"), "the refusal event")
    assert h.pod("job") is None and h.charges() == 0 and not h.ledger.meters(h.account)
    h.tb.apply(
        [
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "CloudDisk",
                "metadata": {"name": "scratch", "namespace": h.ns},
                "spec": {"capacityGi": 10},
            }
        ]
    )
    disk = h.wait(
        lambda: (
            (s := item(h, "clouddisk", "scratch")).get("phase") == "Ready"
            and any(c["type"] == "Ready" and c["status"] == "True" for c in s["conditions"])
            and s
        ),
        "the disk to be Ready",
    )
    assert disk["claimName"] == "scratch-clouddisk"
    pvc = get_json(h.tb, "pvc", "scratch-clouddisk", "-n", h.ns)
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pv = get_json(h.tb, "pv", pvc["spec"]["volumeName"])
    assert pv["spec"]["hostPath"]["path"] == str(h.tmp / "data/disks" / h.ns / "scratch")
    assert (h.tmp / "data/disks" / h.ns / "scratch").is_dir()
    h.wait_phase("job", "Running")
    pod = h.pod("job")
    assert pod is not None
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"data": "job-data", "cloud-disk-0": "scratch-clouddisk"}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["cloud-disk-0"] == "/root/disks/scratch"
    # deleting the disk while the instance runs is held by the finalizer, with a condition
    h.tb.kubectl("delete", "clouddisk", "scratch", "-n", h.ns, "--wait=false")
    held = h.wait(
        lambda: next(
            (
                c
                for c in item(h, "clouddisk", "scratch").get("conditions") or []
                if c["type"] == "DeletionHeld"
            ),
            None,
        ),
        "the deletion to be held",
    )
    assert held["reason"] == "InUse" and f"{h.ns}/job" in held["message"]
    assert "DeletionHeld" in h.events("scratch")
    assert get_json(h.tb, "pv", pv["metadata"]["name"])["metadata"]["name"]
    h.patch_spec("job", {"state": "Stopped"})
    h.wait_phase("job", "Stopped")
    h.wait(
        lambda: h.tb.kubectl("get", "clouddisk", "scratch", "-n", h.ns, check=False).returncode,
        "the disk's deletion to complete",
    )
    h.wait(
        lambda: h.tb.kubectl("get", "pv", pv["metadata"]["name"], check=False).returncode,
        "the disk's volume to go",
    )
    assert not (h.tmp / "data/disks" / h.ns / "scratch").exists()


def test_arrears_shutdown_refunds_the_unused_package_term(arrears: Harness, hook: Hook) -> None:
    """A day package (L40S 112.00) shut down by arrears 5 h into its term keeps 5 h at the
    pay-as-you-go rate (26.00) and refunds 86.00, which pays the debt: arrears end."""
    h = arrears
    h.fund(112_00)
    h.start()
    h.instance("pkg", L40S, mode="Package", period="Day")
    st = h.wait_phase("pkg", "Running")
    start = st["packageTerms"][0]["start"]
    uid = h.get("pkg")["metadata"]["uid"]
    assert h.ledger.balance(h.account) == 0
    h.wait(lambda: acct_status(h).get("state") in ("Active", "LowBalance"), "the account state")
    h.advance(5 * 3600)
    arrears_at = h.clock.now()
    h.ledger.post_entry(h.account, EntryKind.ADJUSTMENT, -1_00, f"{h.ns}:late-fee", at=arrears_at)
    h.wait(lambda: any(m["type"] == "Arrears" for m in hook.received), "the arrears webhook")
    st = h.wait_phase("pkg", "Stopped")
    assert st["stoppedAt"] == arrears_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "ArrearsShutdown" in h.events("pkg")
    used_s = int((arrears_at - datetime.fromisoformat(start)).total_seconds())
    assert used_s == 5 * 3600
    refund = 112_00 - to_minor(Decimal("5.20") * used_s / 3600)
    assert refund == 86_00
    ledger = [
        (e.kind, e.amount_minor, e.key)
        for e in sorted(h.ledger.entries(h.account, limit=1000), key=lambda e: e.id)
    ]
    assert ledger == [
        (EntryKind.RECHARGE, 112_00, f"{h.ns}:fund"),
        (EntryKind.CHARGE, -112_00, f"package:{uid}:1"),
        (EntryKind.ADJUSTMENT, -1_00, f"{h.ns}:late-fee"),
        (EntryKind.REFUND, 86_00, f"package-refund:{uid}:1"),
    ]
    assert h.ledger.balance(h.account) == 85_00
    assert h.status("pkg")["packageTerms"][0]["end"] == st["stoppedAt"]
    h.wait(lambda: acct_status(h).get("state") != "Arrears", "the refund to end the arrears")
    h.wait(lambda: any(m["type"] == "ArrearsCleared" for m in hook.received), "the webhook")
    assert h.status("pkg")["phase"] == "Stopped"  # until the user starts it again
