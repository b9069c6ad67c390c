"""Time rules through real pods on a file clock: the chart's ``testing.fileClock`` is
mounted into the operator, API and gateway pods, and the test moves it. Packages expire
and renew by the day; arrears shut instances down and, after 7 days, the agent of the
node that held the data deletes it there; a recharge in time saves it. The release goes
back to the system clock at the end of the module."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gpucloud.billing import to_minor
from gpucloud.testing.kind import KindCluster, KindFileClock
from gpucloud.testing.kindrelease import (
    DISK_PER_GIB_HOUR,
    PRICES,
    KindHarness,
    install_release,
)

L40S = "NVIDIA-L40S"
H100 = "NVIDIA-H100-80GB-HBM3"
CPU_NODE = "gpucloud-worker3"  # runs none of our pods
METER = "gpucloud-shared-storage"  # the chart's shared-storage meter (cloudDisks.meter)
MODEL_PODS = "gpucloud.dev/model-deployment=chat"
GI = "gpuinstances"
DAY = 24 * 3600


@pytest.fixture(scope="module")
def clock(
    kind: KindCluster, gpucloud_release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KindFileClock]:
    tmp = tmp_path_factory.mktemp("timed")
    clock = KindFileClock(kind)
    clock.set(datetime.now(UTC).replace(microsecond=0))
    install_release(kind, tmp, {"testing": {"fileClock": clock.path}})
    yield clock
    install_release(kind, tmp)


@pytest.fixture
def h(kind: KindCluster, clock: KindFileClock, kind_namespace: str) -> Iterator[KindHarness]:
    harness = KindHarness(kind, kind_namespace, "gpucloud-system")
    harness.setup()
    yield harness
    harness.close()


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_day_package_reminder_renewal_and_expiry(h: KindHarness, clock: KindFileClock) -> None:
    h.pay_online("topup", "300.00", now=clock.now())
    h.instance("day", L40S, 1, ["sleep", "86400"], mode="Package", period="Day", autoRenew=True)
    st = h.wait_phase(GI, "day", "Running")
    bought = clock.now()
    assert st["packageExpiresAt"] == _fmt(bought + timedelta(days=1))
    assert h.charges() == 112_37  # the day package, storage included
    h.wait(lambda: "PackageExpiring" in h.events("day"), "the expiry reminder")
    clock.advance(DAY)
    h.wait(lambda: len(h.status(GI, "day").get("packageTerms", [])) == 2, "the renewal")
    assert h.charges() == 2 * 112_37 and h.status(GI, "day")["phase"] == "Running"
    clock.advance(DAY)  # 75.26 left: the third day cannot be paid
    h.wait_phase(GI, "day", "Expired")
    assert "RenewalFailed" in h.events("day")
    h.wait(lambda: h.pod("day") is None, "the GPUs to be released")
    assert h.charges() == 2 * 112_37
    assert h.balance() == 300_00 - 2 * 112_37


def _folder(h: KindHarness, node: str, name: str) -> bool:
    path = f"/var/lib/gpucloud/instances/{h.ns}/{name}"
    return (
        h.kind.docker_exec(node, "sh", "-c", f"test -d {path} && echo yes || echo no").strip()
        == "yes"
    )


def _run_into_arrears(h: KindHarness, clock: KindFileClock) -> str:
    """An L40S instance funded for about two hours, run for three: arrears, shutdown."""
    h.pay_online("topup", "12.00", now=clock.now())
    h.instance("nb", L40S, 1, ["sh", "-c", "echo mine > /root/data/f; exec sleep 86400"])
    node = h.wait_phase(GI, "nb", "Running")["node"]
    h.wait(lambda: _folder(h, node, "nb"), "the instance's folder on its node")
    clock.advance(3 * 3600)
    h.wait(lambda: h.status("accounts", h.account).get("arrearsSince"), "arrears")
    st = h.wait_phase(GI, "nb", "Stopped")
    assert "ArrearsShutdown" in h.events("nb") or "Arrears" in str(st.get("conditions"))
    h.wait(lambda: h.pod("nb") is None, "the pod to be deleted")
    return node


def test_arrears_shutdown_then_data_deleted_on_its_node_after_7_days(
    h: KindHarness, clock: KindFileClock
) -> None:
    node = _run_into_arrears(h, clock)
    deletion_at = h.status("accounts", h.account)["dataDeletionAt"]
    clock.advance(6 * DAY)
    assert _folder(h, node, "nb")  # day 6: still kept
    clock.set(datetime.fromisoformat(deletion_at) + timedelta(seconds=1))
    h.wait(lambda: not _folder(h, node, "nb"), "the node's agent to delete the folder", timeout=180)
    h.wait(lambda: "DataDeleted" in h.events("nb"), "the DataDeleted event")
    assert h.balance() < 0  # the debt stays: storage was billed until the deletion


def test_a_recharge_in_time_ends_arrears_and_saves_the_data(
    h: KindHarness, clock: KindFileClock
) -> None:
    node = _run_into_arrears(h, clock)
    deletion_at = h.status("accounts", h.account)["dataDeletionAt"]
    clock.advance(6 * DAY)
    h.pay_online("rescue", "100.00", now=clock.now())
    h.wait(lambda: not h.status("accounts", h.account).get("arrearsSince"), "arrears to end")
    assert h.balance() > 0
    clock.advance(2 * DAY)

    def billed_past_the_old_deadline() -> bool:
        return any(e["meta"]["end"] > deletion_at for e in h.entries("storage:"))

    # the operator has run past the old deletion instant (it billed storage beyond it)
    h.wait(billed_past_the_old_deadline, "storage billed past the old deletion instant")
    assert _folder(h, node, "nb")
    assert "DataDeleted" not in h.events("nb")


def test_private_model_wakes_from_traffic_goes_cold_and_wakes_again(
    h: KindHarness, clock: KindFileClock
) -> None:
    """A private ModelDeployment served by our fake model server image through the
    gateway's pod: the first request wakes it from cold (no request lost), the replica
    holds a GPU of an L40S node, it goes cold after the idle time on the file clock, the
    next request wakes it again, and its online time is billed to the fen."""
    h.pay_online("topup", "100.00", now=clock.now())
    image = h.kind.images().ref("fake-model-server")
    h.apply(
        "ModelDeployment",
        "chat",
        {"model": "tiny-chat", "image": image, "gpu": {"product": L40S, "count": 1},
         "visibility": "Private", "minReplicas": 0, "maxReplicas": 2,
         "scaling": {"targetRequestsPerReplica": 600, "windowSeconds": 600,
                     "coldAfterSeconds": 600}},
    )  # fmt: skip
    md = lambda: h.status("modeldeployments", "chat")  # noqa: E731
    h.wait(lambda: md().get("state") == "Cold", "the model to be created cold")
    token = h.token()
    h.wait(lambda: h.gateway_serves("chat"), "the gateway to list the model")

    woke = clock.now()
    code, answer = h.model_request("chat", token, max_tokens=7)
    assert code == 200 and answer["usage"]["completion_tokens"] == 7, answer
    pods = lambda: h.kind.get_json("pods", "-n", h.ns, "-l", MODEL_PODS)["items"]  # noqa: E731
    (pod,) = pods()
    node = pod["spec"]["nodeName"]
    gpus = h.kind.kubectl(
        "exec", "-n", h.ns, pod["metadata"]["name"], "--", "printenv", "NVIDIA_VISIBLE_DEVICES"
    ).stdout.split(",")
    devices = h.kind.node_devices(node)
    assert devices["labels"]["nvidia.com/gpu.product"] == L40S and len(gpus) == 1
    assert {g.strip() for g in gpus} <= set(devices["uuids"])
    h.wait(lambda: md().get("state") == "Serving", "the model serving")

    # idle past coldAfterSeconds on the file clock: the operator sends it cold
    clock.advance(601)
    h.wait(
        lambda: md().get("state") == "Cold" and not pods(),
        "the model to go cold",
        timeout=120,
    )
    # 601 s online on one L40S at 5.17/h: 0.8631 -> 86 fen
    online = f"model/{h.ns}/chat#online"
    expected = to_minor(PRICES[L40S]["payg"] * 601 / 3600)
    assert expected == 86
    h.wait(lambda: h.charges(online) == expected, "the online time charged", timeout=60)

    # the next request wakes it again and is answered
    code, answer = h.model_request("chat", token, max_tokens=3)
    assert code == 200 and answer["usage"]["completion_tokens"] == 3, answer
    assert woke <= clock.now()
    h.kind.kubectl("delete", "modeldeployment", "chat", "-n", h.ns, "--wait=false")


def _du(h: KindHarness, path: str) -> int:
    """Allocated bytes under ``path`` as GNU du counts them, read on the CPU node: the
    one node none of the test's pods ran on sees the same shared folder."""
    out = h.kind.docker_exec(CPU_NODE, "sh", "-c", f"du -s -B1 {path} 2>/dev/null || echo gone")
    return -1 if out.strip() == "gone" else int(out.split()[0])


def test_cloud_disk_shared_by_two_nodes_metered_once_by_use_and_wiped(
    h: KindHarness, clock: KindFileClock
) -> None:
    """A CloudDisk on the kind tier's shared storage: written from an H100 node, read
    from an L40S node, billed per GiB-hour of the bytes the shared-storage meter measured
    (not the node agents, which see the same folder), and its folder removed by that
    meter when the disk is deleted."""
    h.pay_online("topup", "60.00", now=clock.now())
    hour = clock.now().replace(minute=0, second=0) + timedelta(hours=1)
    clock.set(hour + timedelta(seconds=30))  # billed from early in an hour
    h.apply("CloudDisk", "scratch", {"capacityGi": 1})
    disk = h.wait_phase("clouddisks", "scratch", "Ready")
    since = datetime.fromisoformat(disk["billedSince"])
    folder = f"/var/lib/gpucloud/disks/{h.ns}/scratch"
    write = "dd if=/dev/zero of=/root/disks/scratch/blob bs=1M count=512"
    write += " && touch /root/disks/scratch/done"
    h.instance("writer", H100, 1, ["sh", "-c", f"{write}; sleep 86400"], cloud_disks=["scratch"])
    read = "until test -f /root/disks/scratch/done; do sleep 1; done; ls -ln /root/disks/scratch"
    h.instance("reader", L40S, 1, ["sh", "-c", f"{read}; sleep 86400"], cloud_disks=["scratch"])
    nodes = {h.wait_phase(GI, n, "Running", timeout=180)["node"] for n in ("writer", "reader")}
    assert len(nodes) == 2
    h.wait(lambda: " 536870912 " in h.logs("reader"), "the reader to see the writer's file")
    h.tenant_kubectl("delete", "gi", "writer", "reader", "-n", h.ns, "--wait=false")
    h.wait(lambda: h.pod("writer") is None and h.pod("reader") is None, "the pods to go")
    clock.advance(31)  # the runs settle after the metering grace (30 s, file clock)
    h.wait(
        lambda: not h.kind.get_json("gi", "-n", h.ns)["items"], "the instances to go", timeout=240
    )
    used = _du(h, folder)
    assert used >= 512 * 2**20

    # the hour ends: the meter reports it, the ledger charges exactly its share of the hour
    clock.set(hour + timedelta(hours=1, seconds=5))
    billed = Decimal(used * int((hour + timedelta(hours=1) - since).total_seconds()))
    expected = to_minor(billed * DISK_PER_GIB_HOUR / (3600 * 2**30))
    assert expected >= 2  # ~0.5 GiB x 0.0613/h: a charge to the fen, not a rounded zero
    volume = f"{h.ns}/scratch"
    h.wait(lambda: h.charges(volume) == expected, "the disk's first hour charged", timeout=60)
    usage = h.sql(
        "SELECT node, quantity, start_s FROM ledger_usage WHERE kind = 'cloud_disk' AND owner = ?",
        volume,
    )
    # no node agent reported it; the hour before may hold the empty folder, if the disk
    # was made before the meter saw that hour end: outside the meter's window, not charged
    assert {row[0] for row in usage} == {METER}
    assert [row[1] for row in usage if row[2] == int(hour.timestamp())] == [used]
    meter = h.sql("SELECT node FROM ledger_meters WHERE meter_id = ?", disk["meterId"])
    assert meter == [[METER]]
    refused = h.sql(
        "SELECT count(*) FROM ledger_audit WHERE action = 'usage.refused' AND subject = ?",
        disk["meterId"],
    )
    assert refused == [[0]]

    # deleted: the meter is closed and the shared-storage meter removes the folder
    uid = h.kind.get_json("clouddisk", "scratch", "-n", h.ns)["metadata"]["uid"]
    h.tenant_kubectl("delete", "clouddisk", "scratch", "-n", h.ns, "--wait=false")
    h.wait(lambda: _du(h, folder) == -1, "the meter to remove the disk's folder", timeout=90)
    wipe = h.wait(
        lambda: h.sql(
            "SELECT node, path, bytes_freed FROM ledger_node_wipes WHERE subject = ? "
            "AND done_at IS NOT NULL",
            f"cloud_disk:{uid}",
        ),
        "the wipe reported done",
    )
    assert wipe == [[METER, f"disks/{volume}", used]]
