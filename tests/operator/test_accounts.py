"""Account status, Recharge and RechargeReview against a real SQLite ledger."""

from __future__ import annotations

from datetime import timedelta

from gpucloud_operator.accounts import AccountReconciler, account_state
from opworld import NS, World

from gpucloud.ledger import EntryKind

VOUCHER = "sha256:" + "ab" * 32


def rec(w: World) -> AccountReconciler:
    return AccountReconciler(w.kube, w.ledger, w.clock, w.cfg)


def recharge(w: World, name: str, method: str, amount: str, **extra: object) -> dict:
    spec = {"account": "acme", "method": method, "amount": amount, **extra}
    return w.kube.add_namespaced(
        "recharges",
        {"kind": "Recharge", "metadata": {"name": name, "namespace": NS}, "spec": spec},
    )


def test_account_status(world: World) -> None:
    w = world
    w.fund(12_34)
    acct = w.kube.cluster[("accounts", "acme")]
    rec(w).refresh_account(acct)
    st = acct["status"]
    assert (st["balance"], st["available"], st["currency"], st["state"]) == (
        "12.34",
        "12.34",
        "CNY",
        "Active",
    )
    assert st["runningInstances"] == 0
    w.ledger.post_entry("acme", EntryKind.CHARGE, -20_00, "c1", at=w.clock.now())
    rec(w).refresh_account(acct)
    assert acct["status"]["state"] == "Arrears" and acct["status"]["dataDeletionAt"]
    assert account_state(100, 50) == "Active" and account_state(100, -1) == "LowBalance"


def test_online_recharge_awaits_payment_then_credited(world: World) -> None:
    w = world
    rc = recharge(w, "top", "Online", "500.00", online={"provider": "sandbox"})
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "top")]["status"]
    assert st["phase"] == "AwaitingPayment" and st["orderId"] == f"rc-{rc['metadata']['uid']}"
    assert "amount_minor=50000" in st["paymentURL"] and st["expiresAt"]
    rec(w).reconcile_recharge(w.kube.namespaced[("recharges", NS, "top")])  # idempotent
    w.ledger.settle_order(st["orderId"], "txn-1", 500_00, w.clock.now())
    rec(w).reconcile_recharge(w.kube.namespaced[("recharges", NS, "top")])
    assert w.kube.namespaced[("recharges", NS, "top")]["status"]["phase"] == "Credited"
    assert w.ledger.balance("acme") == 500_00


def test_online_order_expires(world: World) -> None:
    w = world
    rc = recharge(w, "late", "Online", "5.00")
    rec(w).reconcile_recharge(rc)
    w.clock.advance(timedelta(seconds=w.cfg.order_ttl_s))
    rec(w).reconcile_recharge(w.kube.namespaced[("recharges", NS, "late")])
    assert w.kube.namespaced[("recharges", NS, "late")]["status"]["phase"] == "Expired"


def test_bank_transfer_review_credits_exactly_once(world: World) -> None:
    w = world
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-1", "voucherRef": VOUCHER}
    rc = recharge(w, "wire", "BankTransfer", "2000.00", bankTransfer=bt)
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "wire")]["status"]
    assert st["phase"] == "AwaitingReview" and st["orderId"]
    review = w.kube.add_cluster(
        "rechargereviews",
        {
            "metadata": {"name": "r1"},
            "spec": {"rechargeRef": {"namespace": NS, "name": "wire"}, "decision": "Approve"},
        },
    )
    rec(w).reconcile_review(review)
    applied = w.kube.cluster[("rechargereviews", "r1")]["status"]
    assert applied["applied"] is True and applied["voucherRef"] == VOUCHER  # what was reviewed
    assert w.kube.namespaced[("recharges", NS, "wire")]["status"]["phase"] == "Credited"
    # a crash before the status patch: the review is replayed, nothing is credited twice
    review["status"] = {}
    rec(w).reconcile_review(review)
    assert w.ledger.balance("acme") == 2000_00


def test_recharge_for_a_foreign_account_fails(world: World) -> None:
    w = world
    rc = w.kube.add_namespaced(
        "recharges",
        {
            "metadata": {"name": "x", "namespace": "elsewhere"},
            "spec": {"account": "acme", "method": "Online", "amount": "1.00"},
        },
    )
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", "elsewhere", "x")]["status"]
    assert st["phase"] == "Failed" and "does not bill" in st["reason"]


def test_a_recharge_finer_than_the_minor_unit_fails_and_credits_nothing(world: World) -> None:
    """The CRD refuses 10.123 (CEL); should one get past it (a JPY account, whose minor
    unit is 1 yen, or an object stored before the rule), the operator refuses it too,
    naming the field: it never rounds it into the ledger."""
    w = world
    rc = recharge(w, "odd", "Online", "10.123")
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "odd")]["status"]
    assert st["phase"] == "Failed"
    assert st["reason"] == (
        "spec.amount: '10.123' is finer than the minor unit of CNY (at most 2 decimal "
        "places); amounts are never rounded"
    )
    assert not w.ledger.entries("acme") and "rc-" not in str(w.ledger.audit_events("acme"))
    w.kube.add_cluster(  # an account in yen, whose minor unit is the yen itself
        "accounts", {"metadata": {"name": "yen"}, "spec": {"namespaces": [NS], "currency": "JPY"}}
    )
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-9", "voucherRef": VOUCHER}
    rc = w.kube.add_namespaced(
        "recharges",
        {
            "kind": "Recharge",
            "metadata": {"name": "yen", "namespace": NS},
            "spec": {"account": "yen", "method": "BankTransfer", "amount": "100.50",
                     "bankTransfer": bt},
        },
    )  # fmt: skip
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "yen")]["status"]
    assert (
        st["phase"] == "Failed"
        and "finer than the minor unit of JPY (whole units)" in (st["reason"])
    )
    assert w.ledger.vouchers() == []


def test_a_bank_transfer_without_its_voucher_fails_naming_the_field(world: World) -> None:
    """The CRD requires spec.bankTransfer.voucherRef; an object stored before that rule
    is not submitted: nothing for an admin to approve without the voucher."""
    w = world
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-2"}
    rc = recharge(w, "novoucher", "BankTransfer", "2000.00", bankTransfer=bt)
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "novoucher")]["status"]
    assert st["phase"] == "Failed" and st["reason"].startswith(
        "spec.bankTransfer.voucherRef: required"
    )
    assert w.ledger.vouchers() == []
