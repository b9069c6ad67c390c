"""The billing console in a real headless Chromium (Debian's package, Selenium), against
the real stack: the kwok test bed's API server (TokenReview of real ServiceAccount
tokens, SubjectAccessReview for membership), the operator process (instance state,
the Account's burn rate and arrears), and the API process serving the console on the
same SQLite ledger, all on one file clock.

One tenant's story: log in with the keyboard (a bad token first), see the balance and
runway, run into arrears and see the countdown, recharge online (QR code, the sandbox's
signed callback, credited live; arrears end), upload a bank-transfer voucher; an admin
sees it side by side with its figures and approves it; the tenant sees it credited and
downloads the month's statement, whose closing balance is the ledger's; then the same
pages at phone width. Screenshots go to a folder under the test's tmp_path, printed."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opharness import Harness
from selenium.webdriver.support.ui import Select

from gpucloud.api.testserver import SANDBOX_SECRET, ApiProcess
from gpucloud.billing.money import format_money
from gpucloud.recharge import SandboxProvider
from gpucloud.recharge.qr import qr_png
from gpucloud.testing import browser
from gpucloud.testing.kube import get_json

pytestmark = pytest.mark.e2e

L40S = "NVIDIA-L40S"  # 5.20 CNY/h, plus 50 GiB of instance storage at 0.0004: 5.22 CNY/h
DISPLAY = "Acme <Research> & Co"  # tenant-controlled: must show as text


def _rbac(h: Harness) -> dict[str, str]:
    """A payer (may create Recharges in the Account's namespace: a member) and a
    reviewer (an admin by --admin-users), with their ServiceAccount tokens."""
    ns = h.ns
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n, "namespace": ns}}
        for n in ("payer", "reviewer")
    ]
    docs += [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pay", "namespace": ns},
            "rules": [{"apiGroups": ["gpucloud.dev"], "resources": ["recharges"],
                       "verbs": ["create"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "payer-pays", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pay"},
            "subjects": [{"kind": "ServiceAccount", "name": "payer", "namespace": ns}],
        },
    ]  # fmt: skip
    h.tb.apply(docs)
    return {
        sa: h.tb.kubectl("create", "token", sa, "-n", ns).stdout.strip()
        for sa in ("payer", "reviewer")
    }


def _account_status(h: Harness) -> dict[str, Any]:
    return get_json(h.tb, "account", h.account).get("status") or {}


@pytest.fixture
def stack(harness: Harness, tmp_path: Path) -> Iterator[tuple[Harness, ApiProcess, dict]]:
    if (why := browser.missing()) is not None:
        pytest.skip(why)
    h = harness
    h.tb.kubectl("patch", "account", h.account, "--type=merge",
                 "-p", yaml.safe_dump({"spec": {"displayName": DISPLAY}}))  # fmt: skip
    tokens = _rbac(h)
    h.fund(10_44)  # two hours of one L40S and its storage
    h.start()
    h.instance("train", L40S)
    h.wait_phase("train", "Running")
    h.wait(lambda: _account_status(h).get("costPerHour") == "5.22", "the published burn rate")
    api = ApiProcess(
        tmp_path / "api",
        database_url=h.ledger_url,
        clock=f"file:{h.clock.path}",
        static_tokens=False,
        extra_args=[
            "--kubeconfig", str(h.tb.kubeconfig),
            "--admin-users", f"system:serviceaccount:{h.ns}:reviewer",
            "--console-poll-s", "0.3",
        ],
    ).start()  # fmt: skip
    try:
        yield h, api, tokens
    finally:
        api.stop()


def _text(d: Any, css: str) -> str:
    """The rendered text of the first match, read in one script call (a live refresh can
    replace elements between a find and a read)."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''"
    return str(d.execute_script(script, css)).strip()


def _has(d: Any, css: str, text: str) -> bool:
    return text in _text(d, css)


def _keyboard_login(d: Any, token: str) -> None:
    """Tab to the token field (it must be reachable and show its focus), type, Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    d.find_element("tag name", "body").click()
    for _ in range(6):
        ActionChains(d).send_keys(Keys.TAB).perform()
        if d.switch_to.active_element.get_attribute("id") == "token":
            break
    field = d.switch_to.active_element
    assert field.get_attribute("id") == "token", "the token field is not reachable by Tab"
    outline = d.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused field shows no focus outline"
    field.send_keys(token, Keys.ENTER)


def _fill(d: Any, fields: dict[str, str]) -> None:
    for element_id, value in fields.items():
        el = d.find_element("id", element_id)
        el.clear()
        el.send_keys(value)


def _logout(d: Any) -> None:
    d.find_element("css selector", "form[action$='/logout'] button").click()
    browser.wait(d, lambda d: _has(d, "p.notice", "You are logged out."), "the logout")


def test_console_in_a_real_browser(stack: tuple[Harness, ApiProcess, dict], tmp_path: Path) -> None:
    h, api, tokens = stack
    acct = h.account
    page = f"{api.url}/console/a/{acct}"
    money = lambda: format_money(h.ledger.balance(acct), "CNY")  # noqa: E731
    shots_dir = tmp_path / "screenshots"
    print(f"\nconsole screenshots: {shots_dir}")
    with browser.chromium(tmp_path / "downloads") as d:
        shots = browser.Screens(d, shots_dir)
        wait = lambda pred, what: browser.wait(d, pred, what)  # noqa: E731

        # -- log in with the keyboard; a bad token is refused -------------------------------
        d.get(f"{api.url}/console/")
        wait(lambda d: "/console/login" in d.current_url, "the login page")
        _keyboard_login(d, "not-a-token")
        wait(lambda d: _has(d, "#login-error", "not accepted"), "the refusal")
        assert "/console/login" in d.current_url and not d.get_cookie("gpucloud_session")
        shots.shot("bad-login")
        _keyboard_login(d, tokens["payer"])
        wait(lambda d: d.current_url == page, "the account page (the payer's only account)")
        session = d.get_cookie("gpucloud_session")
        assert session["httpOnly"] and session["sameSite"] == "Strict"

        # -- balance, runway, instances --------------------------------------------------
        assert d.find_element("tag name", "h1").text == f"{DISPLAY} ({acct})"
        assert _text(d, "#balance") == "10.44 CNY"
        assert _text(d, "#runway") == "lasts about 2 h at the current rate (5.22 CNY per hour)"
        row = _text(d, "tbody[data-rows=instances] tr")
        assert all(t in row for t in (f"{h.ns}/train", "Running", f"1 × {L40S}", "pay-as-you-go"))
        shots.shot("balance")
        # refreshes that change nothing leave the rows alone (focus inside stays put)
        d.execute_script("window.row = document.querySelector('tbody[data-rows] tr')")
        polls = "return performance.getEntriesByType('resource')" \
                ".filter(e => e.name.endsWith('/live.json')).length"  # fmt: skip
        seen = d.execute_script(polls)
        wait(lambda d: d.execute_script(polls) >= seen + 2, "two more refreshes")
        assert d.execute_script("return document.querySelector('tbody[data-rows] tr') === row")

        # -- the balance runs out: arrears and the retention countdown, live --------------
        h.advance(2 * 3600 + 60)
        wait(lambda d: _has(d, "#state", "Arrears since"), "arrears on the open page")
        wait(lambda d: _has(d, "#retention", "data is deleted in 7 d"), "the countdown")
        shots.shot("arrears")

        # -- recharge online: the QR code, the signed callback, credited live -------------
        _fill(d, {"online-amount": "19.80"})
        d.find_element("css selector", "form[action$='/recharge/online'] button").click()
        wait(lambda d: "/orders/" in d.current_url, "the order page")
        order_id = d.current_url.rsplit("/", 1)[1]
        wait(lambda d: d.execute_script("return document.getElementById('qr').naturalWidth"),
             "the QR code image")  # fmt: skip
        assert _text(d, "#order-status") == "awaiting payment"
        shots.shot("qr-code")
        sandbox = SandboxProvider(SANDBOX_SECRET.encode())
        body, headers = sandbox.paid_callback(order_id, 19_80, "CNY", h.clock.now())
        paid = httpx.post(f"{api.url}/v1/payments/sandbox/callback", content=body,
                          headers=headers, timeout=10)  # fmt: skip
        assert paid.json()["credited"] is True
        wait(lambda d: _text(d, "#order-status") == "paid: credited", "the credit, live")
        wait(lambda d: _text(d, "#balance") == money(), "the new balance, live")
        shots.shot("paid")
        d.get(page)  # the recharge ends arrears: the countdown stops
        wait(lambda d: not _has(d, "#state", "Arrears"), "arrears to end")
        assert not d.find_element("id", "retention").is_displayed()

        # -- bank transfer with the voucher uploaded ---------------------------------------
        voucher_png = tmp_path / "voucher.png"
        voucher_png.write_bytes(qr_png("ICBC transfer T-2026-001: 1000.00 CNY"))
        _fill(d, {"transfer-amount": "1000.00", "transfer-payer": "Acme Research Ltd",
                  "transfer-bank": "ICBC", "transfer-transfer_no": "T-2026-001"})  # fmt: skip
        d.find_element("id", "transfer-file").send_keys(str(voucher_png))
        d.find_element("css selector", "form[action$='/bank-transfer'] button").click()
        wait(lambda d: _has(d, "p.notice", "awaits an admin's review"), "the submission")
        assert _has(d, "#recharges", "awaiting review")
        (voucher,) = h.ledger.vouchers(account=acct)
        shots.shot("voucher-submitted")
        _logout(d)

        # -- the admin reviews it, the file beside the figures ----------------------------
        _keyboard_login(d, tokens["reviewer"])
        d.find_element("link text", "Review transfers").click()
        d.find_element("link text", f"Review {voucher.voucher_id}").click()
        wait(
            lambda d: d.execute_script(
                "return document.getElementById('voucher-file').naturalWidth"
            ),
            "the voucher image",
        )
        assert _text(d, "#voucher-amount") == "1000.00 CNY"
        assert _text(d, "#voucher-payer") == "Acme Research Ltd"
        shots.shot("review-side-by-side")
        d.find_element("id", "decision-approve").click()
        d.find_element("css selector", "form[action$='/review'] button").click()
        wait(lambda d: _has(d, "p.notice", "approved: credited"), "the approval")
        shots.shot("approved")
        _logout(d)

        # -- the tenant sees it credited and downloads the statement ----------------------
        _keyboard_login(d, tokens["payer"])
        wait(lambda d: _has(d, "#recharges", "approved: credited"), "the approved voucher")
        wait(lambda d: _text(d, "#balance") == money(), "the credited balance")
        assert h.ledger.balance(acct) > 1000_00
        d.find_element("link text", "Statement and downloads").click()
        wait(lambda d: _text(d, "#closing") == money(), "the statement's closing balance")
        Select(d.find_element("id", "kind")).select_by_visible_text("payments")
        d.find_element("css selector", "form.filters button").click()
        wait(lambda d: "kind=recharge" in d.current_url, "the filtered statement")
        rows = d.find_elements("css selector", "#entries tbody tr")
        assert {row.text.split()[2] for row in rows} == {"recharge"}
        shots.shot("statement")
        d.find_element("id", "download-csv").click()
        csv_file = browser.downloaded(tmp_path / "downloads", ".csv")
        table = list(csv.reader(io.StringIO(csv_file.read_text())))
        closing = next(r for r in table if r[0] == "closing balance")
        assert f"{closing[5]} CNY" == money()

        # -- phone width: one column, nothing wider than the screen -----------------------
        phone = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
        for url, name in ((page, "phone-account"), (f"{page}/statement", "phone-statement")):
            d.get(url)
            wait(lambda d: d.execute_script("return document.readyState") == "complete", url)
            width = d.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert width[0] <= width[1] == 375, f"{url} is wider than the phone: {width}"
            shots.shot(name)
        d.get(page)
        lefts = d.execute_script(
            "return Array.from(document.querySelectorAll('.two > form'),"
            " f => Math.round(f.getBoundingClientRect().left))"
        )
        assert len(lefts) == 2 and lefts[0] == lefts[1], "the recharge forms are not stacked"
        _logout(d)
        shots.shot("phone-logged-out")
    print(f"console screenshots: {shots_dir} ({shots.n} files)")
