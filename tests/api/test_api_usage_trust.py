"""A node reports only for what it ran (issue 16, finding 1): a meter is charged only for
usage from its pod's node, for at most its GPU count of GPU UUIDs, and for a volume at
most its capacity; everything else is refused per record, counted and audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from apihelpers import T0, T0_S, TOKENS, auth, gpu_record
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucloud.api import Settings
from gpucloud.api.app import create_app
from gpucloud.api.auth import StaticTokenAuthenticator
from gpucloud.billing.money import to_minor
from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger, open_ledger

GPU_PRICE = Decimal("19.80")  # per GPU-hour
DISK_PRICE = Decimal("0.0005")  # per GiB-hour
GIB = 2**30
NODE_A, NODE_B = auth("agent-node-a"), auth("agent-node-b")


def _gpu_meter(lg: Ledger, pod: str, node: str, gpus: int, account: str = "victim") -> None:
    lg.ensure_account(account)
    lg.open_meter(
        f"m-{pod}", account=account, resource=f"ns/{pod}", kind="gpu_time", subject=pod,
        unit_price=GPU_PRICE, unit="gpu_hour", opened_at=T0, gpus=gpus, node=node,
    )  # fmt: skip


def _disk_meter(lg: Ledger, volume: str, capacity: int, account: str = "victim") -> None:
    lg.ensure_account(account)
    lg.open_meter(
        f"d-{volume}", account=account, resource=volume, kind="cloud_disk", subject=volume,
        unit_price=DISK_PRICE, unit="gb_hour", opened_at=T0, max_bytes=capacity,
    )  # fmt: skip


def _disk_record(node: str, volume: str, quantity: int, hour: int = 0) -> dict[str, Any]:
    start = T0_S + 3600 * hour
    return {"kind": "cloud_disk", "node": node, "start": start, "end": start + 3600,
            "quantity": quantity, "volume": volume}  # fmt: skip


def _rejected(client: TestClient, rule: str) -> float:
    registry = client.app.state.gpucloud.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("gpucloud_usage_records_rejected_total", {"reason": rule})


def _made_up(
    node: str, pod: str, gpus: int = 50, seconds: int = 100, tag: str = "madeup"
) -> list[dict[str, Any]]:
    """``gpus`` invented GPU UUIDs x ``seconds``, in 10 s windows, for ``pod``."""
    return [
        {**gpu_record(node=node, pod_uid=pod, start=T0_S + s), "gpu": {
            "uuid": f"GPU-{tag}-{g}", "product": "NVIDIA-A100-SXM4-80GB"}}
        for g in range(gpus)
        for s in range(0, seconds, 10)
    ]  # fmt: skip


def test_one_nodes_token_cannot_charge_another_nodes_pod(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """50 made-up GPUs x 100 s from node-a on node-b's 1-GPU meter: nothing charged."""
    _gpu_meter(ledger, "pod-b", "node-b", gpus=1)
    clock.set(T0 + timedelta(hours=1))
    resp = client.post("/v1/usage", json={"records": _made_up("node-a", "pod-b")}, headers=NODE_A)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert (body["accepted"], body["rejected"]) == (0, 500)
    assert {(e["field"], e["rule"]) for e in body["errors"]} == {("node", "wrong_node")}
    assert "node-b" in body["errors"][0]["message"]
    ledger.rate_pending(T0 + timedelta(hours=1))
    assert ledger.balance("victim") == 0
    assert _rejected(client, "wrong_node") == 500
    [event] = [e for e in ledger.audit_events("victim") if e.action == "usage.refused"]
    assert (event.actor, event.subject, event.detail["records"]) == ("node:node-a", "m-pod-b", 500)


def test_a_pod_is_charged_for_its_own_gpu_count_only(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """The pod's own node reporting 50 GPUs for a 1-GPU pod: the first GPU it reports is
    bound to the meter, every other one refused."""
    _gpu_meter(ledger, "pod-b", "node-b", gpus=1)
    clock.set(T0 + timedelta(hours=1))
    resp = client.post("/v1/usage", json={"records": _made_up("node-b", "pod-b")}, headers=NODE_B)
    assert resp.status_code == 207, resp.text
    body = resp.json()
    assert (body["accepted"], body["rejected"]) == (10, 490)
    assert {(e["field"], e["rule"]) for e in body["errors"]} == {("gpu.uuid", "unbound_gpu")}
    assert ledger.get_meter("m-pod-b").gpu_uuids == ("GPU-madeup-0",)
    ledger.rate_pending(T0 + timedelta(hours=1))
    assert ledger.balance("victim") == -to_minor(GPU_PRICE * 100 / 3600)
    assert _rejected(client, "unbound_gpu") == 490


def test_disk_bytes_are_capped_by_the_volumes_capacity(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """2^55 bytes on a cloud disk is refused by the wire bounds; more than the disk's
    capacity by its meter; the disk's real use is charged."""
    _disk_meter(ledger, "ns/disk", capacity=100 * GIB)
    clock.set(T0 + timedelta(hours=4))
    huge = client.post(
        "/v1/usage", json={"records": [_disk_record("node-a", "ns/disk", 2**55)]}, headers=NODE_A
    )
    assert huge.status_code == 422, huge.text
    assert huge.json()["errors"][0]["field"] == "quantity"
    records = [
        _disk_record("node-a", "ns/disk", 101 * GIB, hour=1),
        _disk_record("node-a", "ns/disk", 3 * GIB, hour=2),
    ]
    resp = client.post("/v1/usage", json={"records": records}, headers=NODE_A)
    assert resp.status_code == 207, resp.text
    [error] = resp.json()["errors"]
    assert (error["index"], error["field"], error["rule"]) == (0, "quantity", "over_capacity")
    ledger.rate_pending(T0 + timedelta(hours=4))
    assert ledger.balance("victim") == -to_minor(DISK_PRICE * 3)


def test_usage_stored_before_its_meter_opened_is_charged_only_from_the_pods_node(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    """Records that arrive before the operator opens the meter cannot be checked then;
    the meter rates only its node's, for its GPU count."""
    clock.set(T0 + timedelta(hours=1))
    forged = _made_up("node-a", "pod-b", gpus=3, seconds=30, tag="forged")
    own = _made_up("node-b", "pod-b", gpus=2, seconds=30, tag="own")
    assert client.post("/v1/usage", json={"records": forged}, headers=NODE_A).status_code == 200
    assert client.post("/v1/usage", json={"records": own}, headers=NODE_B).status_code == 200
    _gpu_meter(ledger, "pod-b", "node-b", gpus=1)
    ledger.rate_pending(T0 + timedelta(hours=1))
    meter = ledger.get_meter("m-pod-b")
    assert (meter.quantity_rated, meter.gpu_uuids) == (30, ("GPU-own-0",))
    assert ledger.balance("victim") == -to_minor(GPU_PRICE * 30 / 3600)


# -- the property: whatever a node sends, no meter is charged beyond what it could use --
PODS = {"pod-a1": ("node-a", 1), "pod-a2": ("node-a", 2), "pod-b1": ("node-b", 1)}
DISK_CAP = 7 * GIB
HORIZON_S = 120  # usage is sent inside [T0, T0 + HORIZON_S)

_gpu = st.builds(
    lambda node, pod, gpu, start, length: {
        **gpu_record(node=node, pod_uid=pod, start=T0_S + start, length=length),
        "gpu": {"uuid": f"GPU-{gpu}", "product": "NVIDIA-A100-SXM4-80GB"},
    },
    st.sampled_from(["node-a", "node-b"]),
    st.sampled_from([*PODS, "pod-unknown"]),
    st.integers(0, 9),
    st.integers(0, HORIZON_S - 10),
    st.integers(1, 10),
)
_disk = st.builds(
    lambda node, quantity: _disk_record(node, "ns/disk", quantity),
    st.sampled_from(["node-a", "node-b"]),
    st.integers(0, 2**50),
)
_batch = st.lists(st.one_of(_gpu, _gpu, _disk), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def property_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Ledger]]:
    """One API and ledger for every example: charges accumulate, and the bound must hold
    after every batch."""
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('prop')) / 'ledger.db'}"
    lg = open_ledger(url)
    for pod, (node, gpus) in PODS.items():
        _gpu_meter(lg, pod, node, gpus, account=f"acct-{pod}")
    _disk_meter(lg, "ns/disk", DISK_CAP, account="acct-disk")
    clock = ManualClock(T0 + timedelta(seconds=HORIZON_S))
    settings_ = Settings(
        database_url=url, authenticator=StaticTokenAuthenticator(TOKENS), clock=clock
    )
    with TestClient(create_app(settings_)) as c:
        yield c, lg
    lg.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=_batch, sender=st.sampled_from(["node-a", "node-b"]))
def test_property_no_batch_charges_more_than_the_nodes_pods_could_use(
    property_api: tuple[TestClient, Ledger], batch: list[dict[str, Any]], sender: str
) -> None:
    client, lg = property_api
    resp = client.post("/v1/usage", json={"records": batch}, headers=auth(f"agent-{sender}"))
    assert resp.status_code in (200, 207, 422), resp.text
    lg.rate_pending(T0 + timedelta(seconds=HORIZON_S))
    for pod, (_node, gpus) in PODS.items():
        most = to_minor(GPU_PRICE * gpus * HORIZON_S / 3600)  # rounded once, half-even
        charged = -lg.balance(f"acct-{pod}")
        assert 0 <= charged <= most + 1, (pod, charged, most)
        meter = lg.get_meter(f"m-{pod}")
        assert meter.quantity_rated <= gpus * HORIZON_S
        assert len(meter.gpu_uuids) <= gpus
    disk = lg.get_meter("d-ns/disk")
    assert disk.quantity_rated <= DISK_CAP * 3600
