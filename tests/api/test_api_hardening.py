"""Bad input is a 4xx naming the field, before anything large is read (issue 16,
findings 5, 6 and 8): size limits and the token or signature before the body, strict
JSON, bounded integers, no NUL in text, operational endpoints on their own port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apihelpers import T0, T0_S, auth, gpu_record, ops_client
from fastapi.testclient import TestClient

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.recharge import SandboxProvider
from gpucloud.recharge.signing import SIGNATURE_HEADER

TENANT, AGENT = auth("tenant-token"), auth("agent-node-a")
CALLBACK = "/v1/payments/sandbox/callback"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with ApiProcess(tmp_path_factory.mktemp("hardening")) as proc:
        yield proc


def _head_only(api: ApiProcess, request_line: str, headers: dict[str, str]) -> str:
    """Send a request's head that announces a huge body, never send the body, and return
    the status line: the API must answer from the head alone (before this, it read the
    whole body first: 400 MiB took it from 92 to 889 MiB)."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"{request_line}\r\nHost: x\r\n{head}\r\n".encode())
        return s.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def test_a_huge_callback_is_refused_before_its_body_is_read(api: ApiProcess) -> None:
    big = {"Content-Type": "application/json", "Content-Length": str(400 * 2**20)}
    assert " 413 " in _head_only(api, f"POST {CALLBACK} HTTP/1.1", big)
    signed = {**big, "Content-Length": "1000", SIGNATURE_HEADER: "t=1,v1=" + "0" * 64}
    # a stale or forged signature: refused from the header alone (the body never comes)
    assert " 401 " in _head_only(api, f"POST {CALLBACK} HTTP/1.1", signed)


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(api: ApiProcess) -> None:
    route = "POST /v1/accounts/acme/recharges/online HTTP/1.1"
    huge = {"Content-Type": "application/json", "Content-Length": str(300 * 2**20)}
    assert " 413 " in _head_only(api, route, huge)
    small = {**huge, "Content-Length": "100"}
    assert " 401 " in _head_only(api, route, small)  # no token: before reading 100 bytes


def test_a_chunked_body_is_cut_at_the_routes_limit(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"amount_minor": 100, "provider": "'
        for _ in range(100):
            yield b"x" * 1024

    resp = client.post("/v1/accounts/acme/recharges/online", content=chunks(), headers=TENANT)
    assert resp.status_code == 413 and "body" in resp.json()["detail"]


@pytest.mark.parametrize(
    "t", ["\u00b2", "1" * 5000, "١٢٣"], ids=["superscript", "5000-digits", "arabic"]
)
def test_malformed_signature_timestamps_are_401(client: TestClient, t: str) -> None:
    header = f"t={t},v1={'0' * 64}".encode()
    resp = client.post(CALLBACK, content=b"{}", headers={SIGNATURE_HEADER: header})  # type: ignore[dict-item]
    assert resp.status_code == 401, resp.text
    assert SIGNATURE_HEADER in resp.json()["detail"]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_400_naming_the_body(client: TestClient, number: bytes) -> None:
    body = b'{"amount_minor": ' + number + b"}"
    headers = {**TENANT, "Content-Type": "application/json"}
    resp = client.post("/v1/accounts/acme/recharges/online", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"].startswith("body")
    usage = client.post("/v1/usage", content=b'{"records": [' + number + b"]}", headers=AGENT)
    assert usage.status_code in (400, 422), usage.text


def test_deep_nesting_is_400(client: TestClient) -> None:
    deep = b'{"records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert client.post("/v1/usage", content=deep, headers=AGENT).status_code == 400
    review = b'{"decision": "approve", "reason": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    headers = {**auth("admin-token"), "Content-Type": "application/json"}
    resp = client.post("/v1/vouchers/v/review", content=review, headers=headers)
    assert resp.status_code == 400 and resp.json()["detail"].startswith("body")


def _disk(quantity: int, start: int = T0_S) -> dict[str, Any]:
    return {"kind": "cloud_disk", "node": "node-a", "start": start, "end": start + 3600,
            "quantity": quantity, "volume": "ns/disk"}  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (gpu_record(start=2**64), "start"),
        ({**gpu_record(), "start": 2**63, "end": 2**63 + 10}, "start"),
        (_disk(2**60), "quantity"),  # 2^60 bytes x 3600 s >= 2^63
        ({**_disk(2**40), "end": T0_S + 2**40}, "end"),  # a window of 2^40 s
        ({**_disk(2**40), "end": T0_S + 7200}, ""),  # volume windows are at most 1 h
    ],
    ids=["start-2^64", "start-2^63", "bytes-2^60", "window-2^40", "window-2h"],
)
def test_out_of_range_integers_are_refused_per_record_and_lose_nothing(
    client: TestClient, bad: dict[str, Any], field: str
) -> None:
    good = gpu_record(gpu=7)
    resp = client.post("/v1/usage", json={"records": [bad, good]}, headers=AGENT)
    assert resp.status_code == 207, resp.text
    assert resp.json()["accepted"] == 1  # the batch is not lost
    errors = resp.json()["errors"]
    assert {e["index"] for e in errors} == {0} and errors[0]["field"] == field


def test_nul_characters_are_4xx_naming_the_field(
    client: TestClient, sandbox: SandboxProvider
) -> None:
    """On PostgreSQL a NUL in a text column was a 500."""
    record = gpu_record()
    record["pod"] = {**record["pod"], "name": "inst\x001"}
    resp = client.post("/v1/usage", json={"records": [record]}, headers=AGENT)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "pod.name"
    transfer = {"amount_minor": 100, "payer": "ACME\x00", "bank": "B", "transfer_no": "T1"}
    resp = client.post("/v1/accounts/acme/recharges/bank-transfer", json=transfer, headers=TENANT)
    assert resp.status_code == 400 and "body.payer" in resp.json()["detail"]
    assert client.get("/v1/accounts/acme/orders/a%00b", headers=TENANT).status_code == 400
    body, headers = sandbox.paid_callback("o\x001", 100, "CNY", T0)
    resp = client.post(CALLBACK, content=body, headers=headers)
    assert resp.status_code == 422 and "order_id" in resp.json()["detail"]


def test_metrics_are_on_the_operational_port_only(client: TestClient, api: ApiProcess) -> None:
    """/metrics names accounts, routes and volumes: not for tenants or the internet."""
    main = client.get("/metrics")
    assert main.status_code in (401, 404) and "gpucloud_" not in main.text
    assert "gpucloud_usage_records_ingested_total" in ops_client(client).get("/metrics").text
    assert httpx.get(f"{api.url}/metrics").status_code in (401, 404)
    assert "gpucloud_api_request_seconds" in httpx.get(f"{api.ops_url}/metrics").text


def test_the_agent_token_still_works_after_the_guard(api: ApiProcess, tmp_path: Path) -> None:
    resp = httpx.post(
        f"{api.url}/v1/usage",
        json={"records": [gpu_record()]},
        headers=auth(agent_token("node-a")),
    )
    assert resp.status_code == 200, resp.text
