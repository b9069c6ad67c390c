"""A tenant's GPU instances through real pods: our chart's operator, API and agents in our
images, the real kubelet and our fake device plugin; money checked to the fen from the
ledger the API pod writes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

from gpucloud.billing import to_minor
from gpucloud.testing.kindrelease import PRICES, STORAGE_PER_GIB_HOUR, KindHarness

L40S = "NVIDIA-L40S"
H100 = "NVIDIA-H100-80GB-HBM3"
GI = "gpuinstances"


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_online_recharge_then_a_payg_instance_metered_by_its_nodes_agent(
    h: KindHarness,
) -> None:
    # 1. online recharge: an order, the provider's signed callback, the credit
    rc = h.pay_online("topup", "100.00")
    assert rc["orderId"] and h.balance() == 100_00
    assert [e["amount"] for e in h.entries() if e["kind"] == "recharge"] == [100_00]

    # 2. a pay-as-you-go instance: a real pod with 2 GPUs and a real volume
    script = (
        "cat /root/data/kept 2>/dev/null || echo written-by-run-1 > /root/data/kept; "
        'echo "gpus=$NVIDIA_VISIBLE_DEVICES"; exec sleep 3600'
    )
    # 2000 GiB: a fen of storage every 36 s, so that a short test sees storage charged
    h.instance("nb", L40S, 2, ["sh", "-c", script], quota_gi=2000)
    st = h.wait_phase(GI, "nb", "Running")
    pod = h.pod("nb")
    node = st["node"]
    assert pod is not None and pod["spec"]["nodeName"] == node == "gpucloud-worker2"
    h.wait(lambda: "gpus=" in h.logs("nb"), "the instance's first output")
    gpus = h.logs("nb").split("gpus=")[1].split()[0].split(",")
    assert len(set(gpus)) == 2 and set(gpus) <= set(h.kind.node_devices(st["node"])["uuids"])
    uid = pod["metadata"]["uid"]

    # 3. its node's agent meters it through the kubelet's pod-resources
    def metered() -> int:
        rows = h.sql(
            "SELECT COUNT(DISTINCT subject), SUM(measure) FROM ledger_usage "
            "WHERE owner = ? AND kind = 'gpu_time'",
            uid,
        )
        return rows[0][1] or 0 if rows[0][0] == 2 else 0

    h.wait(lambda: metered() >= 20, "20 GPU-seconds of agent usage in the ledger")
    subjects = {
        r[0] for r in h.sql("SELECT DISTINCT subject FROM ledger_usage WHERE owner = ?", uid)
    }
    assert subjects == set(gpus)

    # 4. stop: the run is settled by the second, from the agent's GPU-seconds
    h.patch_spec(GI, "nb", {"state": "Stopped"})
    st = h.wait_phase(GI, "nb", "Stopped")
    h.wait(lambda: h.pod("nb") is None, "the pod to be deleted")
    h.wait(lambda: not h.status(GI, "nb").get("unsettledMeters"), "the run's settlement")
    [meter] = h.sql(
        "SELECT meter_id, quantity_rated, posted_minor, fallback_quantity FROM ledger_meters "
        "WHERE resource = ? AND kind = 'gpu_time'",
        f"{h.ns}/nb",
    )
    meter_id, gpu_seconds, posted, fallback = meter[0], int(meter[1]), meter[2], meter[3]
    assert fallback == 0  # all of it came from the agent, none from control-plane times
    ran = _seconds(st["startedAt"], st["stoppedAt"])
    assert 2 * (ran - 3) <= gpu_seconds <= 2 * (ran + 3), (gpu_seconds, ran)
    run_cost = to_minor(PRICES[L40S]["payg"] * gpu_seconds / 3600)
    assert posted == run_cost == -sum(e["amount"] for e in h.entries(f"meter:{meter_id}:"))

    # 5. start again: same node, the tenant's file is still there
    h.patch_spec(GI, "nb", {"state": "Running"})
    st2 = h.wait_phase(GI, "nb", "Running")
    assert st2["node"] == node
    h.wait(lambda: "gpus=" in h.logs("nb"), "the second run's output")
    assert h.logs("nb").startswith("written-by-run-1")
    storage_since = st2["storageSince"]

    # 6. release: the second run and the storage, settled by the second
    released = datetime.now(UTC)
    h.kind.kubectl("delete", "gpuinstance", "nb", "-n", h.ns, "--wait=false")
    h.wait(
        lambda: h.kind.kubectl("get", "gpuinstance", "nb", "-n", h.ns, check=False).returncode,
        "the instance to be released",
        timeout=180,
    )
    meters = h.sql(
        "SELECT quantity_rated, posted_minor, settled_at, fallback_quantity FROM ledger_meters "
        "WHERE resource = ?",
        f"{h.ns}/nb",
    )
    assert len(meters) == 2 and all(m[2] for m in meters), meters
    assert all(
        m[1] == to_minor(PRICES[L40S]["payg"] * (int(m[0]) + int(m[3] or 0)) / 3600) for m in meters
    ), meters
    # storage: the 2000 GiB quota from the volume's start to the release, in contiguous
    # windows, rounded once for the whole span
    storage = h.entries("storage:")
    windows = sorted((e["meta"]["start"], e["meta"]["end"]) for e in storage)
    assert windows[0][0] == storage_since
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))
    stored_s = _seconds(windows[0][0], windows[-1][1])
    assert abs(_seconds(released.isoformat(), windows[-1][1])) < 10
    expected = to_minor(STORAGE_PER_GIB_HOUR * 2000 * Decimal(int(stored_s)) / 3600)
    assert expected > 0
    assert sum(-e["amount"] for e in storage) == expected
    runs = sum(m[1] for m in meters)
    assert h.charges() == runs + expected
    assert h.balance() == 100_00 - h.charges()


def test_spot_is_preempted_for_payg_with_notice_and_grace_and_keeps_its_data(
    h: KindHarness,
) -> None:
    h.pay_online("topup", "100.00")
    script = "echo spot-data > /root/data/kept; exec sleep 3600"
    h.instance("spot", L40S, 4, ["sh", "-c", script], mode="Spot")  # the whole L40S node
    spot = h.wait_phase(GI, "spot", "Running")
    h.wait(lambda: h.pod("spot") and h.pod("spot")["status"].get("phase") == "Running",
           "the spot pod to run")  # fmt: skip
    h.instance("payg", L40S, 2, ["sleep", "3600"])
    noticed = h.wait(lambda: h.status(GI, "spot").get("preemptAt"), "the preemption notice")
    assert "PreemptionNotice" in h.events("spot")
    conds = {c["type"]: c for c in h.status(GI, "spot")["conditions"]}
    assert conds["Preempting"]["status"] == "True"
    # within the grace period the spot instance still runs and holds the GPUs
    assert h.status(GI, "spot")["phase"] == "Running"
    assert h.status(GI, "payg")["phase"] == "Pending"
    stopped = h.wait_phase(GI, "spot", "Preempted", timeout=90)
    h.wait(lambda: h.pod("spot") is None, "the spot pod to be deleted")
    payg = h.wait_phase(GI, "payg", "Running")
    assert payg["node"] == spot["node"]
    # never billed past the notice's stop time, and at the spot price
    assert _seconds(stopped["stoppedAt"], noticed) >= 0
    h.wait(lambda: not h.status(GI, "spot").get("unsettledMeters"), "the spot run's settlement")
    [(gpu_seconds, posted)] = h.sql(
        "SELECT quantity_rated, posted_minor FROM ledger_meters WHERE resource = ?",
        f"{h.ns}/spot",
    )
    assert int(gpu_seconds) <= 4 * (_seconds(spot["startedAt"], noticed) + 2)
    assert posted == to_minor(PRICES[L40S]["spot"] * int(gpu_seconds) / 3600)
    # its data is kept: the volume is still there and bound to the claim
    pvc = h.kind.get_json("pvc", "spot-data", "-n", h.ns)
    assert pvc["status"]["phase"] == "Bound"
    files = h.kind.docker_exec(spot["node"], "cat", f"/var/lib/gpucloud/instances/{h.ns}/spot/kept")
    assert files.strip() == "spot-data"


def test_the_notice_file_shows_the_stop_time_and_the_checkpoint_runs_before_it(
    h: KindHarness,
) -> None:
    """What kwok cannot show: the real kubelet refreshes the pod's downward-API notice
    file when the operator annotates the pod (empty before), and runs the checkpoint as
    the preStop hook before the deadline; the checkpoint here copies the file into the
    instance's data, read back from the node's disk."""
    h.pay_online("topup", "100.00")
    notice = "/etc/gpucloud/notice/preempt-at"
    save = f"cat {notice} > /root/data/notice-seen"
    checkpoint = {"command": ["sh", "-c", save], "timeoutSeconds": 5}
    h.instance("spot", L40S, 4, ["sleep", "3600"], mode="Spot", spot={"checkpoint": checkpoint})
    spot = h.wait_phase(GI, "spot", "Running")
    h.wait(lambda: h.pod("spot") and h.pod("spot")["status"].get("phase") == "Running",
           "the spot pod to run")  # fmt: skip

    def read_notice() -> str:
        out = h.kind.kubectl("exec", "-n", h.ns, "spot-gpu", "--", "cat", notice, check=False)
        return out.stdout if out.returncode == 0 else "unreadable"

    assert read_notice() == ""  # no notice yet: the file exists and is empty
    h.instance("payg", L40S, 2, ["sleep", "3600"])
    stop_at = h.wait(lambda: h.status(GI, "spot").get("preemptAt"), "the preemption notice")
    h.wait(lambda: read_notice() == stop_at, "the kubelet to write the stop time into the file")
    h.wait_phase(GI, "spot", "Preempted", timeout=90)
    h.wait(lambda: h.pod("spot") is None, "the spot pod to be deleted")
    seen = h.kind.docker_exec(
        spot["node"], "cat", f"/var/lib/gpucloud/instances/{h.ns}/spot/notice-seen"
    )
    assert seen == stop_at  # the checkpoint ran, and read the notice
