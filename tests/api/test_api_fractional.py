"""MIG slices and time-sliced shares, billed by what they are (issue 19): each meter is
opened for its product; a node's records of another product, or of another kind of
device (a MIG UUID, a replica ``<uuid>::<n>``, a whole GPU), are refused, and each slice
or share is charged exactly at its own price."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from apihelpers import T0, T0_S, auth
from fastapi.testclient import TestClient

from gpucloud.billing.money import to_minor
from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger

MIG = "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
SHARED = "NVIDIA-H100-80GB-HBM3-SHARED"
WHOLE = "NVIDIA-H100-80GB-HBM3"
PRICES = {MIG: Decimal("2.83"), SHARED: Decimal("4.95"), WHOLE: Decimal("19.80")}
NODE = auth("agent-node-a")
GPU = "GPU-8c1e5a4f-0d8b-4b3a-9c7e-2f6a1b3c4d5e"


def _meter(lg: Ledger, pod: str, product: str, account: str) -> None:
    lg.ensure_account(account)
    lg.open_meter(
        f"m-{pod}", account=account, resource=f"ns/{pod}", kind="gpu_time", subject=pod,
        unit_price=PRICES[product], unit="gpu_hour", opened_at=T0, gpus=1, node="node-a",
        gpu_product=product,
    )  # fmt: skip


def _records(pod: str, device: str, product: str, seconds: int) -> list[dict[str, Any]]:
    """``seconds`` of ``device`` held by ``pod``, in the agent's 10 s windows."""
    return [
        {
            "kind": "gpu_time", "node": "node-a", "start": T0_S + s,
            "end": T0_S + min(s + 10, seconds), "quantity": min(10, seconds - s),
            "gpu": {"uuid": device, "product": product},
            "pod": {"namespace": "tenants", "name": pod, "uid": pod},
        }
        for s in range(0, seconds, 10)
    ]  # fmt: skip


def _mig(i: int) -> str:
    return f"MIG-5f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c{i:02d}"


def test_seven_1g_slices_each_billed_exactly_its_slice(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """A GPU split 7 x 1g.10gb, seven tenants, uneven run lengths: each account pays
    2.83/h x its own seconds, rounded once."""
    seconds = [1234, 601, 3599, 7, 2500, 999, 3600]
    for i in range(len(seconds)):
        _meter(ledger, f"pod-{i}", MIG, f"tenant-{i}")
    records = [r for i, n in enumerate(seconds) for r in _records(f"pod-{i}", _mig(i), MIG, n)]
    clock.set(T0 + timedelta(hours=2))
    resp = client.post("/v1/usage", json={"records": records}, headers=NODE)
    assert resp.status_code == 200, resp.text
    ledger.rate_pending(T0 + timedelta(hours=2))
    for i, n in enumerate(seconds):
        assert ledger.balance(f"tenant-{i}") == -to_minor(PRICES[MIG] * n / 3600), i
        assert ledger.get_meter(f"m-pod-{i}").gpu_uuids == (_mig(i),)
    # 1234 s at 2.83/h is 0.97003... CNY: 0.97 (never a whole GPU's 6.79)
    assert ledger.balance("tenant-0") == -97


def test_four_time_sliced_shares_each_billed_per_share(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """One GPU shared by 4 pods (replicas GPU::0..3): each pays 4.95/h per share."""
    for n in range(4):
        _meter(ledger, f"share-{n}", SHARED, f"sharer-{n}")
    records = [r for n in range(4) for r in _records(f"share-{n}", f"{GPU}::{n}", SHARED, 1801)]
    clock.set(T0 + timedelta(hours=1))
    resp = client.post("/v1/usage", json={"records": records}, headers=NODE)
    assert resp.status_code == 200, resp.text
    ledger.rate_pending(T0 + timedelta(hours=1))
    for n in range(4):
        # 1801 s x 4.95/h = 2.476375 -> 2.48 each
        assert ledger.balance(f"sharer-{n}") == -248


def test_a_node_cannot_bill_a_slice_as_a_whole_gpu_or_a_share_as_a_slice(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """The untrusted agent names the product and the device; the meter's product decides:
    a whole-GPU product for a MIG pod, a MIG UUID under a shared meter, a whole GPU's UUID
    under a MIG meter are refused, named, and never charged."""
    _meter(ledger, "mig-pod", MIG, "t-mig")
    _meter(ledger, "share-pod", SHARED, "t-share")
    clock.set(T0 + timedelta(hours=1))
    batch = [
        *_records("mig-pod", _mig(1), WHOLE, 30),  # a slice reported as a whole GPU
        *_records("mig-pod", GPU, MIG, 30),  # a whole GPU's UUID as the slice
        *_records("share-pod", _mig(2), SHARED, 30),  # a MIG device as a share
        *_records("share-pod", GPU, SHARED, 30),  # the whole GPU as a share
    ]
    resp = client.post("/v1/usage", json={"records": batch}, headers=NODE)
    assert resp.status_code == 422, resp.text
    errors = {(e["index"] // 3, e["field"], e["rule"]) for e in resp.json()["errors"]}
    assert errors == {
        (0, "gpu.product", "wrong_product"),
        (1, "gpu.uuid", "wrong_device"),
        (2, "gpu.uuid", "wrong_device"),
        (3, "gpu.uuid", "wrong_device"),
    }
    ledger.rate_pending(T0 + timedelta(hours=1))
    assert ledger.balance("t-mig") == ledger.balance("t-share") == 0
    assert ledger.get_meter("m-mig-pod").gpu_uuids == ()


def test_usage_stored_before_the_meter_opened_is_rated_only_for_the_meters_product(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """Records that arrive before the operator opens the meter cannot be checked on
    arrival; when it opens, only its product's devices are bound and rated."""
    clock.set(T0 + timedelta(hours=1))
    early = [*_records("pod-x", GPU, WHOLE, 60), *_records("pod-x", _mig(3), MIG, 40)]
    assert client.post("/v1/usage", json={"records": early}, headers=NODE).status_code == 200
    _meter(ledger, "pod-x", MIG, "t-x")
    ledger.rate_pending(T0 + timedelta(hours=1))
    assert ledger.get_meter("m-pod-x").gpu_uuids == (_mig(3),)
    assert ledger.get_meter("m-pod-x").quantity_rated == 40
    assert ledger.balance("t-x") == -to_minor(PRICES[MIG] * 40 / 3600)
