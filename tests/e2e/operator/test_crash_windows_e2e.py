"""The operator SIGKILLs itself at each crash window of docs/operator.md ("Crash
windows"; gpucloud_operator.crash), the clock moves on while it is down, and the restart
must bill every GPU-second the pods held exactly once: a run from its pod's start as
Kubernetes recorded it, a stop at its request, a spot stop at its notice's deadline, a
package term once. Real operator process, real API server, real SQLite ledger."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from opharness import T0, Harness

from gpucloud.billing import to_minor
from gpucloud.ledger import NotFound

pytestmark = pytest.mark.e2e

L40S = "NVIDIA-L40S"


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def opened_at(h: Harness, meter_id: str) -> datetime | None:
    try:
        return h.ledger.get_meter(meter_id).opened_at
    except NotFound:
        return None


def kube_start(h: Harness, name: str, anchor: datetime) -> datetime:
    """The pod's start on the test's clock, from the pod's own record: the clock when it
    was created plus the kubelet's delay after the creation (kwok's fake kubelet)."""
    pod = h.pod(name)
    assert pod is not None
    state = pod["status"]["containerStatuses"][0]["state"]["running"]
    return anchor + (ts(state["startedAt"]) - ts(pod["metadata"]["creationTimestamp"]))


def test_every_crash_window_bills_each_gpu_second_once(harness: Harness) -> None:
    h = harness
    h.fund(100_00)
    h.instance("nb", L40S, 1)
    # killed after saving the anchor, before creating the pod: the next attempt re-anchors
    h.start(crash_at="anchor-saved")
    assert h.status("nb")["podCreatedAt"] == "2026-01-01T00:00:00Z" and h.pod("nb") is None
    h.advance(100)
    # killed right after creating the pod: it runs (holds its GPUs) while nobody watches
    h.start(crash_at="pod-created")
    assert h.status("nb")["podCreatedAt"] == "2026-01-01T00:01:40Z"
    assert "startedAt" not in h.status("nb")
    h.wait(lambda: (h.pod("nb") or {}).get("status", {}).get("phase") == "Running", "the pod")
    start = kube_start(h, "nb", T0 + timedelta(seconds=100))
    assert start - T0 <= timedelta(seconds=101)  # kwok starts it within a second
    h.advance(300)
    # killed after saving the run's billing, before the ledger's meter exists
    h.start(crash_at="billing-saved")
    st = h.status("nb")
    assert st["startedAt"] == st["meterSince"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert opened_at(h, st["meterId"]) is None
    h.advance(200)
    h.start()
    h.wait(lambda: opened_at(h, st["meterId"]) == start, "the meter, open since the start")
    h.kill()
    h.advance(400)  # t0+1000 s
    h.patch_spec("nb", {"state": "Stopped"})  # asked while the operator is down
    h.start(crash_at="stop-saved")
    assert h.status("nb")["stoppedAt"] == "2026-01-01T00:16:40Z" and h.pod("nb") is not None
    h.advance(50)
    h.start(crash_at="meter-closed")
    assert h.ledger.get_meter(st["meterId"]).closed_at == T0 + timedelta(seconds=1000)
    h.advance(61)
    h.start(crash_at="settled")
    assert h.ledger.get_meter(st["meterId"]).settled_at is not None
    h.start()
    h.wait(lambda: h.status("nb").get("phase") == "Stopped", "the stop")
    h.wait(lambda: "unsettledMeters" not in h.status("nb"), "the settlement bookkeeping")
    held = int((T0 + timedelta(seconds=1000) - start).total_seconds())
    assert h.charges() == to_minor(Decimal("5.20") * held / 3600)
    assert len(h.entries("meter-fallback:")) == 1 and h.pod("nb") is None
    spot_and_package_crash_windows(h)


def spot_and_package_crash_windows(h: Harness) -> None:
    """Part two, in the same namespace (one test bed namespace less to tear down), the
    operator of part one still running: the clock goes on from t0+1111 s."""
    h.fund(1000_00, "more")
    h.instance("spot", L40S, 4, mode="Spot")
    spot = h.wait_phase("spot", "Running")
    h.advance(600)
    h.kill()
    h.instance("payg", L40S, 2)
    # killed right after giving notice: the deadline passes while the operator is down
    h.start(crash_at="notice-given")
    deadline = h.clock.now() + timedelta(seconds=120)
    assert h.status("spot")["preemptAt"] == deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
    h.advance(120 + 1800)
    h.start()
    st = h.wait_phase("spot", "Preempted")
    assert ts(st["stoppedAt"]) == deadline  # the notice's promise, not the restart
    h.wait_phase("payg", "Running")
    h.kill()
    h.advance(61)
    h.instance("day", L40S, 1, mode="Package", period="Day")
    # killed after the term was charged, before status knew: charged once all the same
    h.start(crash_at="term-charged")
    assert len(h.entries("package:")) == 1 and "packageTerms" not in h.status("day")
    h.start()
    day = h.wait_phase("day", "Running")
    assert len(day["packageTerms"]) == 1 and len(h.entries("package:")) == 1
    expiry = ts(day["packageExpiresAt"])
    h.kill()
    h.advance(timedelta(days=1, hours=2).total_seconds())  # it expires while nobody watches
    h.start()
    st = h.wait_phase("day", "Expired")
    assert ts(st["stoppedAt"]) == expiry
    h.wait(lambda: h.status("payg").get("phase") == "Running", "payg still running")
    spot_s = int((deadline - ts(spot["meterSince"])).total_seconds())
    h.wait(lambda: len(h.entries("meter-fallback:")) == 2, "the spot run's settlement")
    spot_charge = -sum(e.amount_minor for e in h.entries("meter") if e.resource.endswith("/spot"))
    assert spot_charge == to_minor(Decimal("2.60") * 4 * spot_s / 3600)
    assert -sum(e.amount_minor for e in h.entries("package:")) == 112_00
