"""Online recharge (order, QR, signed callback) and bank-transfer vouchers."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta

from apihelpers import auth
from fastapi.testclient import TestClient

from gpucloud.clock import ManualClock
from gpucloud.recharge import SIGNATURE_HEADER, SandboxProvider, signature_header

TENANT = auth("tenant-token")
ADMIN = auth("admin-token")
CALLBACK = "/v1/payments/sandbox/callback"
RECEIPT = {"name": "receipt.pdf", "content_base64": base64.b64encode(b"%PDF-1.4 receipt").decode()}
FILE = {"file": RECEIPT}


def _balance(client: TestClient) -> int:
    return client.get("/v1/accounts/acme/balance", headers=TENANT).json()["balance_minor"]


def _order(client: TestClient, amount: int = 10_000) -> dict:
    resp = client.post(
        "/v1/accounts/acme/recharges/online", json={"amount_minor": amount}, headers=TENANT
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_online_order_qr_and_callback_credits_once(
    client: TestClient, sandbox: SandboxProvider, clock: ManualClock
) -> None:
    order = _order(client)
    assert order["status"] == "pending" and order["amount"] == "100.00 CNY"
    assert order["order_id"] in order["payment_url"]
    png = client.get(order["qr_png_url"], headers=TENANT)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    body, headers = sandbox.paid_callback(order["order_id"], 10_000, "CNY", clock.now())
    first = client.post(CALLBACK, content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"order_id": order["order_id"], "status": "paid", "credited": True}
    assert _balance(client) == 10_000
    # The provider retries the very same signed callback (a replay): nothing more credited.
    for _ in range(3):
        replay = client.post(CALLBACK, content=body, headers=headers)
        assert replay.status_code == 200 and replay.json()["credited"] is False
    assert _balance(client) == 10_000
    # Another transaction for the same order (a double payment) is refused.
    body2, headers2 = sandbox.paid_callback(order["order_id"], 10_000, "CNY", clock.now())
    assert client.post(CALLBACK, content=body2, headers=headers2).status_code == 409
    assert _balance(client) == 10_000
    got = client.get(f"/v1/accounts/acme/orders/{order['order_id']}", headers=TENANT).json()
    assert got["status"] == "paid"
    actions = [
        e["action"] for e in client.get("/v1/accounts/acme/audit", headers=TENANT).json()["events"]
    ]
    assert any("order" in a for a in actions)


def test_bad_signatures_are_401_and_credit_nothing(
    client: TestClient, sandbox: SandboxProvider, clock: ManualClock
) -> None:
    order = _order(client)
    body, headers = sandbox.paid_callback(order["order_id"], 10_000, "CNY", clock.now())
    tampered = body.replace(b"10000", b"99999")
    assert client.post(CALLBACK, content=tampered, headers=headers).status_code == 401
    wrong_key = dict(headers)
    wrong_key[SIGNATURE_HEADER] = signature_header(
        b"not-the-secret", int(clock.now().timestamp()), body
    )
    assert client.post(CALLBACK, content=body, headers=wrong_key).status_code == 401
    no_header = {"Content-Type": "application/json"}
    assert client.post(CALLBACK, content=body, headers=no_header).status_code == 401
    garbage = {SIGNATURE_HEADER: "t=abc,v1=00"}
    assert client.post(CALLBACK, content=body, headers=garbage).status_code == 401
    # A correctly signed but stale callback (outside the tolerance window) is refused.
    stale_body, stale_headers = sandbox.paid_callback(
        order["order_id"], 10_000, "CNY", clock.now() - timedelta(minutes=10)
    )
    assert client.post(CALLBACK, content=stale_body, headers=stale_headers).status_code == 401
    assert (
        client.post("/v1/payments/nope/callback", content=body, headers=headers).status_code == 404
    )
    assert _balance(client) == 0


def test_amount_mismatch_and_expired_orders_are_refused(
    client: TestClient, sandbox: SandboxProvider, clock: ManualClock
) -> None:
    order = _order(client, 5_000)
    body, headers = sandbox.paid_callback(order["order_id"], 4_999, "CNY", clock.now())
    resp = client.post(CALLBACK, content=body, headers=headers)
    assert resp.status_code == 409 and resp.json()["reason"] == "amount_mismatch"
    clock.advance(timedelta(minutes=11))  # order_ttl_s is 600 in the fixture
    body, headers = sandbox.paid_callback(order["order_id"], 5_000, "CNY", clock.now())
    resp = client.post(CALLBACK, content=body, headers=headers)
    assert resp.status_code == 409 and resp.json()["reason"] == "expired"
    assert _balance(client) == 0


def test_voucher_approve_credits_once(client: TestClient) -> None:
    content = b"%PDF-1.4 bank transfer receipt"
    resp = client.post(
        "/v1/accounts/acme/recharges/bank-transfer",
        json={
            "amount_minor": 500_000,
            "payer": "ACME Research Ltd",
            "bank": "ICBC",
            "transfer_no": "TX-2026-0001",
            "file": {"name": "receipt.pdf", "content_base64": base64.b64encode(content).decode()},
        },
        headers=TENANT,
    )
    assert resp.status_code == 201, resp.text
    voucher = resp.json()
    assert voucher["status"] == "pending"
    assert voucher["file_sha256"] == hashlib.sha256(content).hexdigest()
    assert _balance(client) == 0
    pending = client.get("/v1/vouchers?status=pending", headers=ADMIN).json()["vouchers"]
    assert [v["voucher_id"] for v in pending] == [voucher["voucher_id"]]
    assert pending[0]["file_sha256"] == voucher["file_sha256"]
    # the reviewing admin reads the very file (tenants cannot reach the admin route)
    file_url = f"/v1/vouchers/{voucher['voucher_id']}/file"
    got = client.get(file_url, headers=ADMIN)
    assert got.status_code == 200 and got.content == content
    assert client.get(file_url, headers=TENANT).status_code == 403
    review = f"/v1/vouchers/{voucher['voucher_id']}/review"
    assert client.post(review, json={"decision": "approve"}, headers=TENANT).status_code == 403
    ok = client.post(review, json={"decision": "approve"}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["status"] == "approved"
    assert ok.json()["reviewer"] == "alice-admin"
    assert _balance(client) == 500_000
    again = client.post(review, json={"decision": "approve"}, headers=ADMIN)
    assert again.status_code == 409
    assert (
        client.post(
            review, json={"decision": "reject", "reason": "late"}, headers=ADMIN
        ).status_code
        == 409
    )
    assert _balance(client) == 500_000
    events = client.get("/v1/accounts/acme/audit", headers=TENANT).json()["events"]
    assert any("voucher" in e["action"] for e in events)


def test_voucher_reject_needs_a_reason(client: TestClient) -> None:
    resp = client.post(
        "/v1/accounts/acme/recharges/bank-transfer",
        json={"amount_minor": 700, "payer": "p", "bank": "b", "transfer_no": "TX-2"},
        headers=TENANT,
    )
    assert resp.status_code == 422 and "file" in resp.text  # the voucher is required
    assert client.get("/v1/vouchers", headers=ADMIN).json()["vouchers"] == []
    resp = client.post(
        "/v1/accounts/acme/recharges/bank-transfer",
        json={
            "amount_minor": 700,
            "payer": "p",
            "bank": "b",
            "transfer_no": "TX-2",
            "file": RECEIPT,
        },
        headers=TENANT,
    )
    assert resp.status_code == 201 and resp.json()["file_sha256"]
    review = f"/v1/vouchers/{resp.json()['voucher_id']}/review"
    no_reason = client.post(review, json={"decision": "reject", "reason": "  "}, headers=ADMIN)
    assert no_reason.status_code == 422 and "reason" in no_reason.text
    ok = client.post(
        review, json={"decision": "reject", "reason": "no such transfer"}, headers=ADMIN
    )
    assert ok.status_code == 200
    assert ok.json()["status"] == "rejected" and ok.json()["reason"] == "no such transfer"
    assert _balance(client) == 0


def test_accounts_are_private(client: TestClient) -> None:
    _order(client)
    assert (
        client.get("/v1/accounts/acme/balance", headers=auth("stranger-token")).status_code == 403
    )
    resp = client.post(
        "/v1/accounts/acme/recharges/online",
        json={"amount_minor": 1},
        headers=auth("stranger-token"),
    )
    assert resp.status_code == 403
    assert client.get("/v1/accounts/acme/balance").status_code == 401
    bad = client.post(
        "/v1/accounts/acme/recharges/bank-transfer",
        json={
            "amount_minor": 1,
            "payer": "p",
            "bank": "b",
            "transfer_no": "t",
            "file": {"name": "x", "content_base64": "***"},
        },
        headers=TENANT,
    )
    assert bad.status_code == 422 and "content_base64" in bad.text
    assert json.loads(client.get("/v1/vouchers", headers=TENANT).text)["detail"]


def test_amounts_finer_than_the_minor_unit_are_refused_never_rounded(
    client: TestClient,
) -> None:
    """10.123 is not 10.12: the API refuses it, naming the field and the rule, for an
    online order and a bank transfer alike; 10.12 as text is 1012 fen."""
    online = "/v1/accounts/acme/recharges/online"
    bank = "/v1/accounts/acme/recharges/bank-transfer"
    transfer = {"payer": "p", "bank": "b", "transfer_no": "TX-9", "file": RECEIPT}
    for url, extra in ((online, {}), (bank, transfer)):
        resp = client.post(url, json={"amount": "10.123", **extra}, headers=TENANT)
        assert resp.status_code == 422, resp.text
        assert "amount: '10.123' is finer than the minor unit of CNY" in resp.text
        assert "at most 2 decimal places" in resp.text
    resp = client.post(online, json={"amount_minor": 1012.3}, headers=TENANT)
    assert resp.status_code == 422 and "amount_minor" in resp.text
    both = client.post(online, json={"amount": "1", "amount_minor": 100}, headers=TENANT)
    assert both.status_code == 422 and "exactly one" in both.text
    ok = client.post(online, json={"amount": "10.12"}, headers=TENANT)
    assert ok.status_code == 201 and ok.json()["amount_minor"] == 1012
    assert _balance(client) == 0
    assert client.get("/v1/vouchers", headers=ADMIN).json()["vouchers"] == []


def _transfer(client: TestClient, headers: dict[str, str], account: str = "acme", **kw: object):  # type: ignore[no-untyped-def]
    body = {
        "amount_minor": 10**12, "payer": "ACME", "bank": "ICBC", "transfer_no": "TX-77",
        "file": RECEIPT,
    }  # fmt: skip
    return client.post(
        f"/v1/accounts/{account}/recharges/bank-transfer", json={**body, **kw}, headers=headers
    )


def test_one_person_cannot_submit_and_approve_a_voucher(client: TestClient) -> None:
    """Issue 16, finding 4: an admin (who may act on any account) submitted 10^12 minor
    units and approved them; the audit trail named the tenant as the submitter."""
    voucher = _transfer(client, ADMIN).json()
    assert voucher["submitter"] == "alice-admin"
    resp = client.post(
        f"/v1/vouchers/{voucher['voucher_id']}/review", json={"decision": "approve"}, headers=ADMIN
    )
    assert resp.status_code == 409 and resp.json()["reason"] == "own_voucher", resp.text
    assert _balance(client) == 0
    audit = client.get("/v1/accounts/acme/audit", headers=ADMIN).json()["events"]
    assert [(e["actor"], e["action"]) for e in audit] == [
        ("alice-admin", "voucher.submitted"),
        ("alice-admin", "voucher.review_refused"),
    ]


def test_order_ids_and_transfer_numbers_are_per_account(client: TestClient) -> None:
    """Issue 16, finding 7: one tenant squatted another's order id, and a duplicate
    transfer number revealed another tenant's voucher id."""
    mallory = auth("stranger-token")
    squat = client.post(
        "/v1/accounts/evil/recharges/online",
        json={"amount_minor": 1, "client_order_id": "acme-2026-11"},
        headers=mallory,
    )
    assert squat.status_code == 201, squat.text
    mine = client.post(
        "/v1/accounts/acme/recharges/online",
        json={"amount_minor": 10_000, "client_order_id": "acme-2026-11"},
        headers=TENANT,
    )
    assert mine.status_code == 201, mine.text
    assert mine.json()["order_id"] != squat.json()["order_id"]
    assert mine.json()["client_order_id"] == "acme-2026-11"
    # the other tenant's order is not found through this account, and says nothing
    other = client.get(f"/v1/accounts/acme/orders/{squat.json()['order_id']}", headers=TENANT)
    assert other.status_code == 404 and "evil" not in other.text
    theirs = _transfer(client, mallory, account="evil", amount_minor=5)
    assert theirs.status_code == 201
    own = _transfer(client, TENANT, amount_minor=500)
    assert own.status_code == 201 and own.json()["voucher_id"] != theirs.json()["voucher_id"]
    again = _transfer(client, TENANT, amount_minor=501)
    assert again.status_code == 409
    assert theirs.json()["voucher_id"] not in again.text and "evil" not in again.text
