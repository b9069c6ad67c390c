"""The spot preemption contract end to end (docs/spot.md): the operator process on the
test bed, a real SQLite ledger, a file clock, a real webhook server and the operator's
/metrics. A spot instance with a checkpoint and ``resume`` is preempted by a
pay-as-you-go start: the notice reaches its pod's annotation (the downward-API notice
file's source; kwok runs no kubelet, so the kind tier proves the file itself) and the
account's webhook once; its pod is asked to stop the checkpoint's timeout before the
deadline; it waits Queued, billed nothing, and starts a new run on its node once the
GPUs there are free. Every run is billed at its own rate to the fen: 6.93/h spot, 19.80/h
pay-as-you-go."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opharness import Harness

from gpucloud.billing import to_minor
from gpucloud.testing.net import free_port
from gpucloud.testing.testbed import REPO, Testbed
from gpucloud.testing.webhook import Hook, running_hook

pytestmark = pytest.mark.e2e

H100 = "NVIDIA-H100-80GB-HBM3"  # the test bed has one node of 8
NOTICE = "gpucloud.dev/preempt-at"


@pytest.fixture
def spot_bed(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[tuple[Harness, Hook]]:
    """The harness with the account's webhook, /metrics, and a PriceBook of its own in
    which the H100 costs 19.80/h pay-as-you-go and 6.93/h spot."""
    pb = yaml.safe_load((REPO / "examples" / "pricebook.yaml").read_text())
    pb["metadata"] = {"name": namespace}
    row = next(g for g in pb["spec"]["gpus"] if g["product"] == H100)
    row |= {"payAsYouGoPerHour": "19.80", "spotPerHour": "6.93"}
    with running_hook() as hook:
        h = Harness(
            testbed,
            namespace,
            tmp_path,
            webhook_url=hook.url,
            metrics_port=free_port(),
            pricebook=namespace,
        )
        h.setup()
        testbed.apply([pb])
        try:
            yield h, hook
        finally:
            h.close()
            testbed.kubectl("delete", "pricebook", namespace, "--wait=false", check=False)


def metric(h: Harness, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{h.settings['metrics_port']}/metrics", timeout=5).text
    line = f'{name}{{product="{H100}"}} '
    return sum(float(x.split(" ")[1]) for x in text.splitlines() if x.startswith(line))


def gpu_meters(h: Harness, name: str) -> list[Any]:
    return [m for m in h.ledger.meters(h.account) if m.resource == f"{h.ns}/{name}"]


def test_notice_checkpoint_queue_and_resume_billed_to_the_fen(
    spot_bed: tuple[Harness, Hook],
) -> None:
    h, hook = spot_bed
    h.fund(1000_00)
    h.start()
    checkpoint = {"command": ["sh", "-c", "sync"], "timeoutSeconds": 30}
    h.instance("spot", H100, 8, mode="Spot", spot={"checkpoint": checkpoint, "resume": True})
    h.wait_phase("spot", "Running")
    pod = h.pod("spot")
    assert pod is not None
    # the contract inside the pod: the notice file, its path in the environment, the
    # checkpoint as the preStop hook with its timeout as the grace period
    assert pod["metadata"]["annotations"][NOTICE] == ""
    (notice,) = [v for v in pod["spec"]["volumes"] if "downwardAPI" in v]
    assert notice["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{NOTICE}']"
    )
    c = pod["spec"]["containers"][0]
    assert {"name": notice["name"], "mountPath": "/etc/gpucloud/notice", "readOnly": True} in (
        c["volumeMounts"]
    )
    assert {"name": "GPUCLOUD_PREEMPT_NOTICE_FILE", "value": "/etc/gpucloud/notice/preempt-at"} in (
        c["env"]
    )
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "-c", "sync"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30

    h.advance(600)
    h.instance("payg", H100, 4)
    h.wait(lambda: h.status("spot").get("preemptStopAt"), "the notice to be delivered")
    st = h.status("spot")
    assert st["preemptAt"] == "2026-01-01T00:12:00Z"
    assert st["preemptStopAt"] == "2026-01-01T00:11:30Z"  # the checkpoint's 30 s earlier
    pod = h.pod("spot")
    assert pod is not None and pod["metadata"]["annotations"][NOTICE] == "2026-01-01T00:12:00Z"
    assert "PreemptionNotice" in h.events("spot")
    h.wait(lambda: hook.of_type("spot.preemption"), "the webhook")
    sent = hook.of_type("spot.preemption")[0]
    assert (sent["account"], sent["namespace"], sent["instance"]) == (h.account, h.ns, "spot")
    assert (sent["stopAt"], sent["checkpointAt"]) == (
        "2026-01-01T00:12:00Z",
        "2026-01-01T00:11:30Z",
    )
    assert sent["resume"] is True and sent["reason"] == "GPUsNeeded"

    h.advance(60)  # 00:11:00: inside the notice, before the checkpoint
    assert h.status("spot")["phase"] == "Running"
    h.advance(30)  # 00:11:30: the pod is asked to stop; the instance queues
    h.wait_phase("spot", "Queued")
    h.wait_phase("payg", "Running")
    h.wait(lambda: h.pod("spot") is None, "the spot pod to be deleted")
    assert len(hook.of_type("spot.preemption")) == 1  # once, after all those passes
    assert metric(h, "gpucloud_spot_preemption_notices_total") == 1
    assert metric(h, "gpucloud_spot_preemptions_total") == 1
    h.advance(61)  # 00:12:31: the first spot run is settled, at the spot rate
    h.wait(lambda: gpu_meters(h, "spot")[0].posted_minor, "the spot run's settlement")
    (run1,) = gpu_meters(h, "spot")
    assert run1.unit_price == Decimal("6.93")
    assert (run1.closed_at - run1.opened_at).total_seconds() == 690
    assert run1.posted_minor == to_minor(Decimal("6.93") * 8 * 690 / 3600) == 10_63
    st = h.status("spot")
    assert st["phase"] == "Queued" and "queued" in st["message"]
    assert metric(h, "gpucloud_spot_resumes_total") == 0

    h.patch_spec("payg", {"state": "Stopped"})  # its 4 GPUs come free: the spot resumes
    st = h.wait(
        lambda: (s := h.status("spot")).get("phase") == "Running" and s.get("runs") == 2 and s,
        "the spot instance to run again",
    )
    assert st["node"] == "gpu-h100-0" and st["meterSince"] == "2026-01-01T00:12:31Z"
    assert metric(h, "gpucloud_spot_resumes_total") == 1
    h.advance(100)
    h.patch_spec("spot", {"state": "Stopped"})
    h.wait_phase("spot", "Stopped")
    h.advance(61)
    h.wait(lambda: all(m.posted_minor for m in gpu_meters(h, "spot")), "the second run")
    h.wait(lambda: gpu_meters(h, "payg")[0].posted_minor, "the pay-as-you-go run")
    runs = gpu_meters(h, "spot")
    assert [m.posted_minor for m in runs] == [10_63, to_minor(Decimal("6.93") * 8 * 100 / 3600)]
    assert runs[1].opened_at > runs[0].closed_at  # nothing billed while queued
    (payg,) = gpu_meters(h, "payg")
    held = (payg.closed_at - payg.opened_at).total_seconds()
    assert payg.unit_price == Decimal("19.80") and held == 61
    assert payg.posted_minor == to_minor(Decimal("19.80") * 4 * 61 / 3600) == 1_34
    assert h.charges() == 10_63 + 1_54 + 1_34  # within the first hour: no storage yet
