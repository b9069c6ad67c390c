"""The console's HTML routes in-process (TestClient) on a real ledger: sign-in and its
cookie, redirects, CSRF refusals, escaping of tenant-controlled strings, recharges,
the admin's review of what they saw, and the statement. The browser test is
tests/e2e/test_console_browser_e2e.py."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apihelpers import T0, TOKENS
from fastapi.testclient import TestClient

from gpucloud.api import Settings
from gpucloud.api.app import create_app
from gpucloud.api.auth import ClusterAccess, StaticTokenAuthenticator
from gpucloud.api.console.session import LOGIN_COOKIE, SESSION_COOKIE, csrf_for
from gpucloud.api.kube import FixedCluster, KubeReader
from gpucloud.api.main import parse_args
from gpucloud.clock import ManualClock
from gpucloud.ledger import EntryKind, Ledger
from gpucloud.recharge import ProviderRegistry, SandboxProvider
from gpucloud.testing.net import free_port

EVIL = '<script>alert("owned")</script>'
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
CALLBACK = "/v1/payments/sandbox/callback"


def objects() -> list[dict[str, Any]]:
    return [
        {
            "kind": "Account",
            "metadata": {"name": "acme"},
            "spec": {"displayName": EVIL, "namespaces": ["acme-research"], "currency": "CNY"},
            "status": {"state": "Active", "costPerHour": "19.80"},
        },
        {
            "kind": "GPUInstance",
            "metadata": {"name": "train", "namespace": "acme-research"},
            "spec": {"gpu": {"product": "NVIDIA-A100", "count": 2}, "billing": {"mode": "Spot"}},
            "status": {"phase": "Running", "billingMode": "Spot"},
        },
        {  # another account's: never shown to acme
            "kind": "GPUInstance",
            "metadata": {"name": "secret", "namespace": "evil-ns"},
            "spec": {"gpu": {"product": "NVIDIA-A100"}, "billing": {"mode": "Spot"}},
        },
    ]


@pytest.fixture
def console(
    db_url: str, clock: ManualClock, sandbox: SandboxProvider, tmp_path: Path, ledger: Ledger
) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url,
        authenticator=StaticTokenAuthenticator(TOKENS),
        clock=clock,
        providers=ProviderRegistry([sandbox]),
        voucher_dir=tmp_path / "vouchers",
        max_voucher_bytes=4096,
        cluster=FixedCluster(objects()),
    )
    ledger.ensure_account("acme", "CNY")
    with TestClient(create_app(settings), follow_redirects=False) as c:
        yield c


def login(c: TestClient, token: str, **headers: str) -> Any:
    """Log in afresh (as another user: a signed-in browser is sent on by the form)."""
    c.cookies.delete(SESSION_COOKIE)
    form = c.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    return c.post(
        "/console/login",
        data={"token": token, "nonce": nonce.group(1), "next": "/console/"},
        headers=headers,
    )


def csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert m is not None, html
    return m.group(1)


def fund(ledger: Ledger, minor: int, key: str = "seed") -> None:
    ledger.post_entry("acme", EntryKind.RECHARGE, minor, key, at=T0)


# -- signing in ------------------------------------------------------------------------------
def test_pages_need_a_session_and_say_where_to_log_in(console: TestClient) -> None:
    page = console.get("/console/a/acme")
    assert page.status_code == 303
    assert page.headers["location"] == "/console/login?next=%2Fconsole%2Fa%2Facme"
    live = console.get("/console/a/acme/live.json")
    assert live.status_code == 401 and live.json()["login"] == "/console/login"
    # a cookie whose token is not (or no longer) accepted: back to the login page, told why
    console.cookies.set(SESSION_COOKIE, "revoked-token", path="/console")
    ended = console.get("/console/a/acme")
    assert ended.status_code == 303 and "ended=1" in ended.headers["location"]
    again = console.get(ended.headers["location"])
    assert "session ended" in again.text and SESSION_COOKIE in again.headers["set-cookie"]


def test_login_sets_a_strict_httponly_cookie_and_never_shows_the_token(
    console: TestClient,
) -> None:
    resp = login(console, "tenant-token")
    assert resp.status_code == 303 and resp.headers["location"] == "/console/"
    cookie = resp.headers["set-cookie"]
    session = next(c for c in cookie.split(", gpucloud") if c.startswith(SESSION_COOKIE))
    attrs = {a.strip().lower() for a in session.split(";")}
    assert {"httponly", "path=/console", "samesite=strict"} <= attrs
    assert "secure" not in attrs  # plain HTTP here
    assert "tenant-token" not in resp.headers["location"]
    home = console.get("/console/")
    assert home.status_code == 303 and home.headers["location"] == "/console/a/acme"
    page = console.get("/console/a/acme")
    assert page.status_code == 200 and "tenant-token" not in page.text
    # behind a TLS-terminating proxy the cookie is Secure
    console.cookies.clear()
    proxied = login(console, "tenant-token", **{"X-Forwarded-Proto": "https"})
    assert "secure" in proxied.headers["set-cookie"].lower()


@pytest.mark.parametrize(
    ("token", "status", "says"),
    [
        ("not-a-token", 401, "not accepted"),
        ("", 422, "token: required"),
        ("two words", 422, "token: only"),
        ("x" * 4000, 422, "token: longer than"),
    ],
)
def test_bad_login_is_refused_without_a_session(
    console: TestClient, token: str, status: int, says: str
) -> None:
    resp = login(console, token)
    assert resp.status_code == status and says in resp.text
    assert console.cookies.get(SESSION_COOKIE) is None
    assert console.get("/console/a/acme").status_code == 303


def test_login_form_must_come_from_the_login_page(console: TestClient) -> None:
    # a cross-site form has no login cookie (SameSite=Strict): refused
    forged = console.post("/console/login", data={"token": "tenant-token", "nonce": "guess"})
    assert forged.status_code == 403 and "login form expired" in forged.text
    console.get("/console/login")
    assert console.cookies.get(LOGIN_COOKIE)
    wrong = console.post("/console/login", data={"token": "tenant-token", "nonce": "guess"})
    assert wrong.status_code == 403
    assert console.get("/console/a/acme").status_code == 303


def test_next_never_leaves_the_console(console: TestClient) -> None:
    form = console.get("/console/login?next=https://evil.example/")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    for target in ("https://evil.example/", "//evil.example/console/", "/console/../x\\y"):
        resp = console.post(
            "/console/login", data={"token": "tenant-token", "nonce": nonce, "next": target}
        )
        assert resp.headers["location"] == "/console/"
        console.cookies.delete(SESSION_COOKIE)
        console.cookies.set(LOGIN_COOKIE, nonce, path="/console/login")


def test_logout_needs_the_csrf_token_and_ends_the_session(console: TestClient) -> None:
    login(console, "tenant-token")
    page = console.get("/console/a/acme")
    assert console.post("/console/logout", data={"csrf": "0" * 64}).status_code == 403
    assert console.get("/console/a/acme").status_code == 200
    out = console.post("/console/logout", data={"csrf": csrf(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/console/login?bye=1"
    assert console.get("/console/a/acme").status_code == 303


def test_security_headers(console: TestClient) -> None:
    login(console, "tenant-token")
    page = console.get("/console/a/acme")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text.replace('<script src="/console/static/console.js"', "")


# -- the account page ------------------------------------------------------------------------
def test_account_page_shows_money_runway_and_instances_escaped(
    console: TestClient, ledger: Ledger
) -> None:
    fund(ledger, 125_40)
    login(console, "tenant-token")
    page = console.get("/console/a/acme")
    assert page.status_code == 200
    assert EVIL not in page.text
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page.text
    assert 'id="balance" data-field="balance">125.40 CNY<' in page.text
    assert "lasts about 6 h 20 min at the current rate (19.80 CNY per hour)" in page.text
    assert "acme-research/train" in page.text and "2 × NVIDIA-A100" in page.text
    assert "evil-ns" not in page.text
    live = console.get("/console/a/acme/live.json").json()
    assert live["balance"] == "125.40 CNY" and live["display_name"] == EVIL
    assert [r["name"] for r in live["instances"]] == ["acme-research/train"]


def test_a_stranger_may_not_open_the_account(console: TestClient) -> None:
    login(console, "stranger-token")
    page = console.get("/console/a/acme")
    assert page.status_code == 403 and "may not use account acme" in page.text
    assert console.get("/console/a/acme/live.json").status_code == 403
    assert console.get("/console/a/acme/statement.csv?period=2026-03").status_code == 403
    assert console.get("/console/admin/vouchers").status_code == 403
    assert console.get("/console/a/Not_A_Name").status_code == 422


def test_state_changing_forms_need_the_sessions_csrf_token(
    console: TestClient, ledger: Ledger
) -> None:
    login(console, "tenant-token")
    for data in ({"amount": "10.00"}, {"amount": "10.00", "csrf": csrf_for("other-token")}):
        resp = console.post("/console/a/acme/recharge/online", data=data)
        assert resp.status_code == 403 and "csrf" in resp.text
        transfer = console.post(
            "/console/a/acme/recharge/bank-transfer",
            data={**data, "payer": "Acme", "bank": "ICBC", "transfer_no": "T-1"},
            files={"file": ("r.png", PNG, "image/png")},
        )
        assert transfer.status_code == 403
    assert ledger.orders("acme") == [] and ledger.vouchers(account="acme") == []


# -- recharging -------------------------------------------------------------------------------
def test_online_recharge_shows_the_qr_and_follows_the_order_until_credited(
    console: TestClient, ledger: Ledger, sandbox: SandboxProvider, clock: ManualClock
) -> None:
    login(console, "tenant-token")
    token = csrf(console.get("/console/a/acme").text)
    finer = console.post("/console/a/acme/recharge/online", data={"csrf": token, "amount": "1.001"})
    assert finer.status_code == 422 and "amount:" in finer.text and 'value="1.001"' in finer.text
    resp = console.post("/console/a/acme/recharge/online", data={"csrf": token, "amount": "19.80"})
    assert resp.status_code == 303
    order_page = console.get(resp.headers["location"])
    (order,) = ledger.orders("acme")
    assert order.amount_minor == 19_80 and order.order_id in order_page.text
    qr = console.get(f"/console/a/acme/orders/{order.order_id}/qr.png")
    assert qr.status_code == 200 and qr.content.startswith(b"\x89PNG")
    live = f"/console/a/acme/orders/{order.order_id}.json"
    assert console.get(live).json()["status"] == "awaiting payment"
    body, headers = sandbox.paid_callback(order.order_id, 19_80, "CNY", clock.now())
    assert console.post(CALLBACK, content=body, headers=headers).status_code == 200
    done = console.get(live).json()
    assert done["status"] == "paid: credited" and done["balance"] == "19.80 CNY" and done["done"]
    # the account page lists it with its status; another account's order id is not found
    assert "paid: credited" in console.get("/console/a/acme").text
    login(console, "stranger-token")
    assert console.get(f"/console/a/evil/orders/{order.order_id}").status_code in (403, 404)


def test_bank_transfer_upload_is_checked_and_kept(
    console: TestClient, ledger: Ledger, tmp_path: Path
) -> None:
    login(console, "tenant-token")
    token = csrf(console.get("/console/a/acme").text)
    fields = {"csrf": token, "amount": "1000.00", "payer": "Acme <b>Ltd</b>", "bank": "ICBC",
              "transfer_no": "T-77"}  # fmt: skip
    url = "/console/a/acme/recharge/bank-transfer"
    no_file = console.post(url, data=fields, files={"file": ("", b"", "image/png")})
    assert no_file.status_code == 422 and "file: choose the transfer voucher" in no_file.text
    big = console.post(url, data=fields, files={"file": ("r.png", PNG * 100, "image/png")})
    assert big.status_code == 413 and "file: larger than 4096 bytes" in big.text
    blank = console.post(url, data={**fields, "payer": ""}, files={"file": ("r.png", PNG)})
    assert blank.status_code == 422 and "payer:" in blank.text
    assert ledger.vouchers(account="acme") == []
    ok = console.post(url, data=fields, files={"file": ("r.png", PNG, "image/png")})
    assert ok.status_code == 303
    (voucher,) = ledger.vouchers(account="acme")
    assert voucher.file_sha256 == hashlib.sha256(PNG).hexdigest()
    assert (tmp_path / "vouchers" / voucher.file_sha256).read_bytes() == PNG
    page = console.get(ok.headers["location"])
    assert f"Voucher {voucher.voucher_id} submitted" in page.text
    assert "awaiting review" in page.text


def _submit(console: TestClient, content: bytes, transfer_no: str = "T-9") -> None:
    login(console, "tenant-token")
    token = csrf(console.get("/console/a/acme").text)
    fields = {"csrf": token, "amount": "1000.00", "payer": '<img src=x onerror="alert(1)">',
              "bank": "ICBC", "transfer_no": transfer_no}  # fmt: skip
    resp = console.post(
        "/console/a/acme/recharge/bank-transfer", data=fields, files={"file": ("v", content)}
    )
    assert resp.status_code == 303, resp.text


def test_admin_approves_only_what_they_saw(console: TestClient, ledger: Ledger) -> None:
    _submit(console, PNG)
    (voucher,) = ledger.vouchers(account="acme")
    assert console.get("/console/admin/vouchers").status_code == 403  # a tenant
    login(console, "admin-token")
    queue = console.get("/console/admin/vouchers")
    assert voucher.voucher_id in queue.text and "1000.00 CNY" in queue.text
    assert "<img src=x" not in queue.text and "&lt;img src=x" in queue.text
    page = console.get(f"/console/admin/vouchers/{voucher.voucher_id}")
    file_url = f"/console/admin/vouchers/{voucher.voucher_id}/file"
    assert f'<img id="voucher-file" src="{file_url}"' in page.text
    shown = console.get(file_url)
    assert shown.headers["content-type"] == "image/png" and shown.content == PNG
    assert shown.headers["content-disposition"].startswith("inline")
    form = {"csrf": csrf(page.text), "decision": "approve", "reason": "",
            "file_sha256": voucher.file_sha256, "amount_minor": "100000"}  # fmt: skip
    review = f"/console/admin/vouchers/{voucher.voucher_id}/review"
    assert console.post(review, data={**form, "csrf": ""}).status_code == 403
    other = console.post(review, data={**form, "file_sha256": "0" * 64})
    assert other.status_code == 409 and "not the voucher file you were shown" in other.text
    more = console.post(review, data={**form, "amount_minor": "1000000"})
    assert more.status_code == 409
    reject = console.post(review, data={**form, "decision": "reject"})
    assert reject.status_code == 422 and "reason: required" in reject.text
    assert ledger.balance("acme") == 0
    done = console.post(review, data=form)
    assert done.status_code == 303
    assert "approved: credited" in console.get(done.headers["location"]).text
    assert ledger.balance("acme") == 1000_00
    again = console.post(review, data=form)
    assert again.status_code == 409 and ledger.balance("acme") == 1000_00


def test_a_voucher_that_is_not_an_image_or_pdf_is_never_served_inline(
    console: TestClient, ledger: Ledger
) -> None:
    _submit(console, b"<html><script>alert(1)</script></html>")
    (voucher,) = ledger.vouchers(account="acme")
    login(console, "admin-token")
    page = console.get(f"/console/admin/vouchers/{voucher.voucher_id}")
    assert "neither an image nor a PDF" in page.text
    served = console.get(f"/console/admin/vouchers/{voucher.voucher_id}/file")
    assert served.headers["content-type"] == "application/octet-stream"
    assert served.headers["content-disposition"].startswith("attachment")
    assert served.headers["x-content-type-options"] == "nosniff"


# -- the statement ------------------------------------------------------------------------------
def test_statement_filters_and_the_csv_closes_at_the_ledgers_balance(
    console: TestClient, ledger: Ledger, clock: ManualClock
) -> None:
    fund(ledger, 500_00)
    for key, minor, resource in (("c1", -19_80, "train"), ("c2", -3_33, "eval")):
        ledger.post_entry(
            "acme", EntryKind.CHARGE, minor, key, resource=f"acme-research/{resource}", at=T0
        )
    login(console, "tenant-token")
    month = clock.now().strftime("%Y-%m")
    page = console.get(f"/console/a/acme/statement?period={month}")
    assert 'id="closing">476.87 CNY<' in page.text
    charges = console.get(
        f"/console/a/acme/statement?period={month}&kind=charge&resource=acme-research/train"
    )
    assert (
        'id="shown-total">-19.80 CNY<' in charges.text
        and "eval" not in charges.text.split("<tbody>")[1]
    )
    bad = console.get("/console/a/acme/statement?period=2026-13")
    assert bad.status_code == 422 and "period:" in bad.text
    download = console.get(f"/console/a/acme/statement.csv?period={month}")
    assert download.headers["content-disposition"] == (
        f'attachment; filename="statement-acme-{month}.csv"'
    )
    rows = list(csv.reader(io.StringIO(download.text)))
    closing = next(r for r in rows if r[0] == "closing balance")
    assert closing[5] == "476.87" and ledger.balance("acme") == 476_87
    pdf = console.get(f"/console/a/acme/statement.pdf?period={month}")
    assert pdf.content.startswith(b"%PDF")
    assert console.get(f"/console/a/acme/statement.txt?period={month}").status_code == 422


# -- the cluster edge ------------------------------------------------------------------------
def test_an_unreachable_cluster_still_shows_the_money(
    db_url: str, clock: ManualClock, ledger: Ledger
) -> None:
    """The real KubeReader against a port nobody listens on: the page says what it could
    not read and still shows the ledger's figures."""
    settings = Settings(
        database_url=db_url,
        authenticator=StaticTokenAuthenticator(TOKENS),
        clock=clock,
        cluster=KubeReader(ClusterAccess(server=f"http://127.0.0.1:{free_port()}"), timeout_s=2),
    )
    ledger.ensure_account("acme", "CNY")
    fund(ledger, 19_80)
    with TestClient(create_app(settings), follow_redirects=False) as c:
        login(c, "tenant-token")
        page = c.get("/console/a/acme")
        assert page.status_code == 200 and "The cluster could not be read" in page.text
        assert 'data-field="balance">19.80 CNY<' in page.text
        assert "unknown: the operator has not published" in page.text
        assert c.get("/console/").status_code == 503  # whose accounts: the cluster must say


def test_console_poll_interval_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--console-poll-s", "0"])
    assert parse_args(["--console-poll-s", "0.5"]).console_poll_s == 0.5


def test_static_files_are_served_with_the_same_headers(console: TestClient) -> None:
    js = console.get("/console/static/console.js")
    assert js.status_code == 200 and "textContent" in js.text
    assert "innerHTML" not in js.text  # tenant strings are never parsed as markup
    assert js.headers["cache-control"] == "public, max-age=300"
    assert js.headers["x-content-type-options"] == "nosniff"
    assert console.get("/console/static/../app.py").status_code == 404


def test_the_login_page_keeps_a_live_session(console: TestClient) -> None:
    """A link to the login page (from anywhere) does not log anyone out."""
    login(console, "tenant-token")
    again = console.get("/console/login?next=/console/a/acme")
    assert again.status_code == 303 and again.headers["location"] == "/console/a/acme"
    assert console.get("/console/a/acme").status_code == 200
