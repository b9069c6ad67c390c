"""The operator as a real process against the test bed: pods, volumes, scheduling and
garbage collection are real; the ledger is a real SQLite file shared with the test;
time rules run on a file clock the test advances. Money is checked to the fen."""

from __future__ import annotations

from decimal import Decimal

import pytest
from opharness import Harness

from gpucloud.billing import to_minor
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord

pytestmark = pytest.mark.e2e

L40S = "NVIDIA-L40S"
A100 = "NVIDIA-A100-SXM4-80GB"
STORAGE_HOUR = to_minor(Decimal("0.0004") * 50)  # 50 GiB quota for one hour: 0.02


def test_payg_start_stop_restart_release_to_the_fen(harness: Harness) -> None:
    h = harness
    h.fund(100_00)
    h.start()
    h.instance("nb", L40S, 2)
    st = h.wait_phase("nb", "Running")
    assert st["gpuSummary"] == "NVIDIA-L40S x2" and st["node"] == "gpu-l40s-0"
    pod = h.pod("nb")
    assert pod is not None and pod["spec"]["nodeName"] == "gpu-l40s-0"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    pvc = h.tb.kubectl("get", "pvc", "nb-data", "-n", h.ns, "-o", "jsonpath={.status.phase}")
    assert pvc.stdout == "Bound"
    assert h.charges() == 0

    h.advance(1000)
    h.patch_spec("nb", {"state": "Stopped"})
    h.wait_phase("nb", "Stopped")
    h.wait(lambda: h.pod("nb") is None, "the pod to be deleted")
    h.advance(61)  # past the metering grace: no agent usage came, bill from the control plane
    h.wait(lambda: h.entries("meter-fallback:"), "the control-plane settlement")
    first = to_minor(Decimal("5.20") * 2 * 1000 / 3600)
    assert h.charges() == first == 289
    assert "control-plane timestamps" in h.entries("meter-fallback:")[0].memo

    h.patch_spec("nb", {"state": "Running"})
    h.wait_phase("nb", "Running")
    h.advance(100)
    h.tb.kubectl("delete", "gpuinstance", "nb", "-n", h.ns, "--wait=false")
    h.wait(lambda: h.status("nb").get("releasedAt"), "the release to begin")
    h.advance(61)
    h.wait(
        lambda: h.tb.kubectl("get", "gpuinstance", "nb", "-n", h.ns, check=False).returncode != 0,
        "the finalizer to let the instance go",
    )
    second = to_minor(Decimal("5.20") * 2 * 100 / 3600)
    storage = to_minor(Decimal("0.0004") * 50 * 1161 / 3600)  # created t0, released t0+1161s
    assert h.charges() == first + second + storage
    pvs = h.tb.kubectl("get", "pv", "-l", "gpucloud.dev/namespace=" + h.ns, "-o", "name")
    assert pvs.stdout.strip() == ""


def test_refusals_cost_nothing_and_too_big_stays_pending(harness: Harness) -> None:
    h = harness
    h.tb.kubectl(
        "patch", "account", h.account, "--type=merge", "-p", '{"spec":{"instanceLimit":2}}'
    )
    h.fund(10_00)
    h.start()
    h.instance("poor", A100, 2)  # one hour is 19.60 + 0.02 storage
    h.instance("odd", "NVIDIA-B200", 1)
    st = h.wait_phase("poor", "Refused")
    assert "InsufficientBalance" in {c["reason"] for c in st["conditions"]}
    assert "19.62 CNY" in st["message"]
    assert "NVIDIA-B200" in h.wait_phase("odd", "Refused")["message"]
    for name in ("poor", "odd"):
        h.tb.kubectl("delete", "gpuinstance", name, "-n", h.ns, "--timeout=60s")
    h.fund(1000_00, "more")
    h.instance("huge", "NVIDIA-GeForce-RTX-4090", 6)  # its only node has 4 GPUs
    h.wait(
        lambda: "Insufficient nvidia.com/gpu" in h.status("huge").get("message", ""),
        "the scheduler's reason",
    )
    assert h.status("huge")["phase"] == "Pending"
    h.instance("one", L40S, 1)
    h.wait_phase("one", "Running")
    h.instance("two", L40S, 1)  # huge (Pending) and one (Running) fill the limit of 2
    st = h.wait_phase("two", "Refused")
    assert "instanceLimit is 2" in st["message"]
    h.advance(30)
    assert h.entries("meter") == [] and h.entries("package") == [] and h.charges() == 0
    # waiting for GPUs is not an instance yet: no storage billing starts (docs/operator.md)
    assert h.status("huge")["phase"] == "Pending" and "storageSince" not in h.status("huge")
    assert h.status("one")["storageSince"]


def test_package_purchase_reminder_expiry_and_auto_renew(harness: Harness) -> None:
    h = harness
    h.fund(300_00)
    h.start()
    h.instance("day", L40S, 1, mode="Package", period="Day", autoRenew=True)
    st = h.wait_phase("day", "Running")
    assert st["packageExpiresAt"] == "2026-01-02T00:00:00Z"
    assert h.charges() == 112_00
    h.wait(lambda: "PackageExpiring" in h.events("day"), "the expiry reminder")
    h.advance(24 * 3600)
    h.wait(lambda: len(h.status("day").get("packageTerms", [])) == 2, "the renewal")
    assert h.charges() == 224_00 and h.status("day")["phase"] == "Running"
    h.advance(24 * 3600)  # 76.00 left: the next term cannot be paid
    st = h.wait_phase("day", "Expired")
    assert "RenewalFailed" in h.events("day")
    h.wait(lambda: h.pod("day") is None, "the GPUs to be released")
    assert h.charges() == 224_00  # storage was included in both terms


def test_spot_preempted_after_grace_by_payg(harness: Harness) -> None:
    h = harness
    h.fund(1000_00)
    h.start()
    h.instance("spot", L40S, 4, mode="Spot")
    h.wait_phase("spot", "Running")
    h.advance(600)
    h.instance("payg", L40S, 2)
    h.wait(lambda: h.status("spot").get("preemptAt"), "the preemption notice")
    assert h.status("spot")["preemptAt"] == "2026-01-01T00:12:00Z"
    assert "PreemptionNotice" in h.events("spot")
    h.advance(60)
    assert h.status("spot")["phase"] == "Running"  # within the grace period
    assert h.status("payg")["phase"] == "Pending"
    h.advance(60)
    h.wait_phase("spot", "Preempted")
    h.wait_phase("payg", "Running")
    h.advance(61)
    h.wait(lambda: h.entries("meter-fallback:"), "the spot run's settlement")
    assert h.charges() == to_minor(Decimal("2.60") * 4 * 720 / 3600)


def test_sigkill_during_stop_and_settlement_charges_once(harness: Harness) -> None:
    h = harness
    h.fund(100_00)
    h.start()
    h.instance("nb", L40S, 1)
    h.wait_phase("nb", "Running")
    h.advance(500)
    h.patch_spec("nb", {"state": "Stopped"})
    h.wait(lambda: h.status("nb").get("phase") in ("Stopping", "Stopped"), "the stop to begin")
    h.kill()
    h.advance(100)  # the operator is down; the stop instant must not move
    h.start()
    h.wait_phase("nb", "Stopped")
    assert h.status("nb")["stoppedAt"] == "2026-01-01T00:08:20Z"
    h.advance(61)
    h.wait(lambda: h.entries("meter-fallback:"), "the settlement")
    h.kill()  # right after the settlement: its status patch may be lost
    h.start()
    h.advance(1)
    h.wait(lambda: "unsettledMeters" not in h.status("nb"), "the settlement bookkeeping")
    assert h.charges() == to_minor(Decimal("5.20") * 500 / 3600) == 72
    assert len(h.entries("meter-fallback:")) == 1


def test_late_agent_usage_after_the_fallback_is_stored_not_charged(harness: Harness) -> None:
    """The agent's usage for part of a run is missing at the end of the grace period:
    the rest is billed from the control plane; when the usage arrives after all, it is
    stored and shown as late on the meter, and the balance does not move."""
    h = harness
    h.fund(100_00)
    h.start()
    h.instance("nb", L40S, 1)
    st = h.wait_phase("nb", "Running")
    pod = h.pod("nb")
    assert pod is not None
    meter = h.ledger.get_meter(st["meterId"])
    t0 = int(meter.opened_at.timestamp())

    def windows(lo: int, hi: int) -> list[UsageRecord]:
        return [
            UsageRecord(
                kind=UsageKind.GPU_TIME,
                node=pod["spec"]["nodeName"],
                start=t0 + s,
                end=t0 + s + 10,
                quantity=10,
                gpu=GPURef(uuid="GPU-e2e-0", product=L40S),
                pod=PodRef(namespace=h.ns, name="nb-gpu", uid=pod["metadata"]["uid"]),
            )
            for s in range(lo, hi, 10)
        ]

    h.ledger.ingest_usage(windows(0, 400), received_at=h.clock.now())
    h.wait(lambda: h.status("nb").get("gpus") == ["GPU-e2e-0"], "status.gpus from the usage")
    h.advance(1000)
    h.patch_spec("nb", {"state": "Stopped"})
    assert "gpus" not in h.wait_phase("nb", "Stopped")
    h.advance(61)
    h.wait(lambda: h.entries("meter-fallback:"), "the control-plane settlement")
    h.wait(lambda: "unsettledMeters" not in h.status("nb"), "the settlement bookkeeping")
    whole_run = to_minor(Decimal("5.20") * 1000 / 3600)
    assert h.charges() == whole_run == 144  # 400 s from the agent, 600 s from the control plane
    assert h.entries("meter-fallback:")[0].meta["gpu_seconds"] == 600
    assert "MeteringFallback" in h.events("nb")
    balance = h.ledger.balance(h.account)

    late = h.ledger.ingest_usage(
        windows(400, 1000), received_at=h.clock.now(), rate_at=h.clock.now()
    )
    assert late.accepted == 60
    h.ledger.rate_pending(h.clock.now())
    assert h.ledger.balance(h.account) == balance and h.charges() == 144
    assert h.status("nb")["accruedCost"] == "1.44"
    m = h.ledger.get_meter(meter.meter_id)
    assert m.settled_at is not None
    assert (m.late_records, m.late_quantity, m.quantity_rated) == (60, 600, 400)
    assert [x.meter_id for x in h.ledger.meters(h.account, late_only=True)] == [meter.meter_id]
