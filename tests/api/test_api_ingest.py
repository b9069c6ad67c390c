"""POST /v1/usage: per-record validation, idempotency, node authorization, rating."""

from __future__ import annotations

from datetime import timedelta

from apihelpers import PRICE, T0, T0_S, auth, gpu_record, open_gpu_meter, ops_client, wait_for
from fastapi.testclient import TestClient

from gpucloud.billing.money import to_minor
from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger

AGENT = auth("agent-node-a")


def test_valid_batch_is_stored_and_resend_changes_nothing(client: TestClient) -> None:
    batch = {
        "records": [gpu_record(gpu=g, start=T0_S + 10 * w) for g in range(8) for w in range(3)]
    }
    first = client.post("/v1/usage", json=batch, headers=AGENT)
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 24, "duplicates": 0, "rejected": 0, "errors": []}
    again = client.post("/v1/usage", json=batch, headers=AGENT)
    assert again.status_code == 200
    assert again.json() == {"accepted": 0, "duplicates": 24, "rejected": 0, "errors": []}


def test_malformed_records_are_reported_by_index_and_field(client: TestClient) -> None:
    missing_start = gpu_record(gpu=1)
    del missing_start["start"]
    negative_qty = gpu_record(gpu=2) | {"quantity": -5}
    too_long = gpu_record(gpu=3, length=11)
    bad_uuid = gpu_record(gpu=4)
    bad_uuid["gpu"] = {"uuid": "nope", "product": "x"}
    batch = {
        "records": [gpu_record(gpu=0), missing_start, negative_qty, too_long, bad_uuid, "junk"]
    }
    resp = client.post("/v1/usage", json=batch, headers=AGENT)
    assert resp.status_code == 207, resp.text
    body = resp.json()
    assert body["accepted"] == 1 and body["rejected"] == 5
    by_index = {}
    for err in body["errors"]:
        by_index.setdefault(err["index"], []).append(err)
    assert {e["field"] for e in by_index[1]} == {"start"}
    assert by_index[1][0]["rule"] == "missing"
    assert by_index[2][0]["field"] == "quantity"
    assert by_index[2][0]["rule"] == "greater_than_equal"
    assert "at most 10 s" in by_index[3][0]["message"]
    assert by_index[4][0]["field"] == "gpu.uuid"
    assert by_index[4][0]["rule"] == "string_pattern_mismatch"
    assert by_index[5][0]["rule"] == "model_type"
    assert 0 not in by_index


def test_nothing_valid_is_422_and_shape_errors(client: TestClient) -> None:
    resp = client.post("/v1/usage", json={"records": [{"kind": "gpu_time"}]}, headers=AGENT)
    assert resp.status_code == 422
    assert resp.json()["accepted"] == 0 and resp.json()["errors"][0]["index"] == 0
    assert client.post("/v1/usage", json=[1], headers=AGENT).status_code == 422
    not_json = client.post("/v1/usage", content=b"{", headers=AGENT)
    assert not_json.status_code == 400
    assert client.post("/v1/usage", json={"records": []}, headers=AGENT).json()["accepted"] == 0


def test_conflicting_resend_is_refused_per_record(client: TestClient) -> None:
    assert (
        client.post("/v1/usage", json={"records": [gpu_record()]}, headers=AGENT).status_code == 200
    )
    changed = gpu_record(pod_uid="pod-other")
    resp = client.post("/v1/usage", json={"records": [gpu_record(gpu=5), changed]}, headers=AGENT)
    assert resp.status_code == 207, resp.text
    assert resp.json()["errors"][0]["index"] == 1
    assert resp.json()["errors"][0]["rule"] in {"conflict", "overlap"}


def test_authentication_and_node_authorization(client: TestClient, ledger: Ledger) -> None:
    batch = {"records": [gpu_record(node="node-a")]}
    assert client.post("/v1/usage", json=batch).status_code == 401
    assert client.post("/v1/usage", json=batch, headers=auth("forged")).status_code == 401
    assert client.post("/v1/usage", json=batch, headers=auth("tenant-token")).status_code == 403
    # A record naming another node is refused on its own; the caller's own is stored.
    mixed = {"records": [gpu_record(node="node-b", gpu=1), gpu_record(node="node-a")]}
    resp = client.post("/v1/usage", json=mixed, headers=AGENT)
    assert resp.status_code == 207, resp.text
    assert resp.json()["accepted"] == 1
    [error] = resp.json()["errors"]
    assert (error["index"], error["field"], error["rule"]) == (0, "node", "wrong_node")
    assert "node-b" in error["message"]
    assert client.post("/v1/usage", json=batch, headers=AGENT).json()["duplicates"] == 1


def test_usage_is_rated_into_the_balance_within_2s(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    open_gpu_meter(ledger, "acme", "pod-1", T0, gpus=2)
    clock.set(T0 + timedelta(hours=1))
    # 2 GPUs x 30 min, in 10 s windows: 3600 GPU-seconds = 1 GPU-hour.
    records = [gpu_record(gpu=g, start=T0_S + 10 * w) for g in range(2) for w in range(180)]
    assert client.post("/v1/usage", json={"records": records}, headers=AGENT).status_code == 200
    expected = -to_minor(PRICE)
    wait_for(
        lambda: (
            client.get("/v1/accounts/acme/balance", headers=auth("tenant-token")).json()[
                "balance_minor"
            ]
            == expected
        ),
        2.0,
        "the charge to reach the balance",
    )
    charges = client.get("/v1/accounts/acme/charges", headers=auth("tenant-token")).json()
    assert sum(c["amount_minor"] for c in charges["charges"]) == -expected
    usage = client.get("/v1/accounts/acme/usage", headers=auth("tenant-token")).json()
    assert sum(r["gpu_seconds"] for r in usage["rows"]) == 3600
    metrics = ops_client(client).get("/metrics").text
    assert "gpucloud_usage_records_ingested_total 360.0" in metrics
    assert "gpucloud_rating_lag_seconds_count" in metrics
