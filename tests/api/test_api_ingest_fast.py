"""POST /v1/usage on its fast path (JSON checked straight into rows, rated in the ingest
transaction) behaves exactly as the per-record model path."""

from __future__ import annotations

from datetime import timedelta

from apihelpers import PRICE, T0, T0_S, auth, gpu_record, open_gpu_meter, wait_for
from fastapi.testclient import TestClient

from gpucloud.billing.money import to_minor
from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger

AGENT = auth("agent-node-a")


def test_the_charge_is_in_the_balance_when_the_batch_is_acknowledged(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    open_gpu_meter(ledger, "acme", "pod-1", T0, gpus=2)
    clock.set(T0 + timedelta(hours=1))
    records = [gpu_record(gpu=g, start=T0_S + 10 * w) for g in range(2) for w in range(180)]
    resp = client.post("/v1/usage", json={"records": records}, headers=AGENT)
    assert resp.json() == {"accepted": 360, "duplicates": 0, "rejected": 0, "errors": []}
    # No waiting for the rating loop: rated in the transaction that stored the usage.
    assert ledger.balance("acme") == -to_minor(PRICE)
    assert ledger.unrated_usage() == []
    again = client.post("/v1/usage", json={"records": records}, headers=AGENT)
    assert again.json()["duplicates"] == 360
    assert ledger.balance("acme") == -to_minor(PRICE)


def test_lax_values_still_take_the_model_path(client: TestClient, ledger: Ledger) -> None:
    lax = {**gpu_record(), "start": str(T0_S), "quantity": 10.0}
    resp = client.post("/v1/usage", json={"records": [lax]}, headers=AGENT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["accepted"] == 1
    # The same record in strict form is a duplicate of it, not a conflict.
    strict = client.post("/v1/usage", json={"records": [gpu_record()]}, headers=AGENT)
    assert strict.json() == {"accepted": 0, "duplicates": 1, "rejected": 0, "errors": []}


def test_usage_not_yet_ended_or_unmetered_waits_for_the_rating_loop(
    client: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    open_gpu_meter(ledger, "acme", "pod-1", T0 + timedelta(seconds=5))
    clock.set(T0 + timedelta(seconds=25))
    records = [
        gpu_record(start=T0_S),  # starts before the meter opened: clipped by the loop
        gpu_record(start=T0_S + 10),  # rated at ingest
        gpu_record(start=T0_S + 20),  # ends after now
        gpu_record(gpu=1, pod_uid="stray", start=T0_S),  # no meter
    ]
    assert client.post("/v1/usage", json={"records": records}, headers=AGENT).status_code == 200
    # The loop rates the first record's 5 metered seconds; the rest stays unrated.
    wait_for(
        lambda: ledger.get_meter("meter-pod-1").quantity_rated == 5 + 10, 2.0, "the rating loop"
    )
    unrated = sorted((u.owner, u.start) for u in ledger.unrated_usage())
    assert unrated == [("pod-1", T0_S + 20), ("stray", T0_S)]
    clock.set(T0 + timedelta(seconds=60))
    wait_for(lambda: ledger.get_meter("meter-pod-1").quantity_rated == 5 + 10 + 10, 3.0, "rating")
    assert [u.owner for u in ledger.unrated_usage()] == ["stray"]
