"""Account status, Recharge and RechargeReview against a real SQLite ledger."""

from __future__ import annotations

from datetime import timedelta

from gpucloud_operator.accounts import AccountReconciler, account_state
from opworld import NS, World

from gpucloud.ledger import EntryKind

VOUCHER = "sha256:" + "ab" * 32


def rec(w: World) -> AccountReconciler:
    return AccountReconciler(w.kube, w.ledger, w.clock, w.cfg)


def recharge(
    w: World, name: str, method: str, amount: str, submitter: str = "bob", **extra: object
) -> dict:
    spec = {"account": "acme", "method": method, "amount": amount, **extra}
    meta = {"name": name, "namespace": NS, "annotations": {"gpucloud.dev/submitter": submitter}}
    return w.kube.add_namespaced("recharges", {"kind": "Recharge", "metadata": meta, "spec": spec})


def review_of(
    w: World, name: str, recharge_name: str, reviewer: str | None = "alice", **spec: object
) -> dict:
    """An admin's review of what they saw of the Recharge now (uid, amount, voucher)."""
    rc = w.kube.namespaced[("recharges", NS, recharge_name)]
    meta: dict = {"name": name}
    if reviewer is not None:
        meta["annotations"] = {"gpucloud.dev/reviewer": reviewer}
    pinned = {
        "rechargeRef": {"namespace": NS, "name": recharge_name, "uid": rc["metadata"]["uid"]},
        "amount": rc["spec"]["amount"],
        "voucherId": rc["status"]["orderId"],
        "decision": "Approve",
    }
    return w.kube.add_cluster("rechargereviews", {"metadata": meta, "spec": {**pinned, **spec}})


def review_message(w: World, name: str) -> str:
    review = w.kube.cluster[("rechargereviews", name)]
    assert review["status"]["applied"] is False
    return " ".join(c["message"] for c in review["status"]["conditions"])


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
    order = w.ledger.find_order("acme", f"rc-{rc['metadata']['uid']}")
    assert order is not None and st["orderId"] == order.order_id
    assert st["phase"] == "AwaitingPayment"
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
    review = review_of(w, "r1", "wire")
    rec(w).reconcile_review(review)
    applied = w.kube.cluster[("rechargereviews", "r1")]["status"]
    assert applied["applied"] is True and applied["voucherRef"] == VOUCHER  # what was reviewed
    assert w.kube.namespaced[("recharges", NS, "wire")]["status"]["phase"] == "Credited"
    # a crash before the status patch: the review is replayed, nothing is credited twice
    review["status"] = {}
    rec(w).reconcile_review(review)
    assert w.ledger.balance("acme") == 2000_00
    trail = [(e.actor, e.action) for e in w.ledger.audit_events("acme")]
    assert ("bob", "voucher.submitted") in trail and ("alice", "voucher.approved") in trail


def test_an_approval_lands_only_on_the_recharge_the_admin_saw(world: World) -> None:
    """The tenant deletes the 100.00 transfer the admin looked at and recreates it under
    the same name for 1,000,000.00: the approval credits nothing (issue 16, finding 2)."""
    w = world
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-7", "voucherRef": VOUCHER}
    rec(w).reconcile_recharge(recharge(w, "wire", "BankTransfer", "100.00", bankTransfer=bt))
    seen = review_of(w, "r-seen", "wire")  # pinned now; applied once the admin creates it
    del w.kube.cluster[("rechargereviews", "r-seen")]
    del w.kube.namespaced[("recharges", NS, "wire")]
    bigger = {**bt, "transferNumber": "TRF-8"}
    rec(w).reconcile_recharge(
        recharge(w, "wire", "BankTransfer", "1000000.00", bankTransfer=bigger)
    )
    review = w.kube.add_cluster("rechargereviews", seen)
    rec(w).reconcile_review(review)
    assert w.ledger.balance("acme") == 0
    assert "spec.rechargeRef.uid" in review_message(w, "r-seen")
    assert w.kube.namespaced[("recharges", NS, "wire")]["status"]["phase"] == "AwaitingReview"
    # the amount and the voucher are pinned too
    for name, spec in (("r-amount", {"amount": "100.00"}), ("r-voucher", {"voucherId": "v0"})):
        rec(w).reconcile_review(review_of(w, name, "wire", **spec))
        assert spec.popitem()[0] in review_message(w, name)
    assert w.ledger.balance("acme") == 0


def test_reviews_need_a_reviewer_other_than_the_submitter(world: World) -> None:
    w = world
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-9", "voucherRef": VOUCHER}
    rc = recharge(w, "wire", "BankTransfer", "250.00", submitter="alice", bankTransfer=bt)
    rec(w).reconcile_recharge(rc)
    rec(w).reconcile_review(review_of(w, "r-none", "wire", reviewer=None))
    assert "gpucloud.dev/reviewer" in review_message(w, "r-none")
    rec(w).reconcile_review(review_of(w, "r-self", "wire", reviewer="alice"))
    assert "submitted" in review_message(w, "r-self")
    assert w.ledger.balance("acme") == 0
    rec(w).reconcile_review(review_of(w, "r-ok", "wire", reviewer="carol"))
    assert w.ledger.balance("acme") == 250_00


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
    """The CRD refuses 10.123 (CEL), and so does the operator's parse of an object stored
    before the rule; a JPY account's minor unit is 1 yen, finer than any CEL rule can
    know, so 100.50 yen is refused by the billing core: neither is ever rounded into the
    ledger."""
    w = world
    rc = recharge(w, "odd", "Online", "10.123")
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "odd")]["status"]
    assert st["phase"] == "Failed"
    assert st["reason"] == (
        "spec.amount: must not be finer than the currency's minor unit: at most 2 decimal "
        "places (0.01 CNY); amounts are never rounded (rule: "
        "self.matches('^[0-9]+([.][0-9]{1,2})?$'))"
    )
    assert not w.ledger.entries("acme") and "rc-" not in str(w.ledger.audit_events("acme"))
    w.kube.add_cluster(  # an account in yen, whose minor unit is the yen itself
        "accounts",
        {"metadata": {"name": "yen"}, "spec": {"namespaces": ["yen-ns"], "currency": "JPY"}},
    )
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-9", "voucherRef": VOUCHER}
    rc = w.kube.add_namespaced(
        "recharges",
        {
            "kind": "Recharge",
            "metadata": {"name": "yen", "namespace": "yen-ns"},
            "spec": {"account": "yen", "method": "BankTransfer", "amount": "100.50",
                     "bankTransfer": bt},
        },
    )  # fmt: skip
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", "yen-ns", "yen")]["status"]
    assert (
        st["phase"] == "Failed"
        and "finer than the minor unit of JPY (whole units)" in (st["reason"])
    )
    assert w.ledger.vouchers() == []


def test_a_bank_transfer_without_its_voucher_fails_naming_the_field(world: World) -> None:
    """The CRD requires spec.bankTransfer.voucherRef; an object stored before that rule
    is refused by the model too and not submitted: nothing to approve without it."""
    w = world
    bt = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-2"}
    rc = recharge(w, "novoucher", "BankTransfer", "2000.00", bankTransfer=bt)
    rec(w).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "novoucher")]["status"]
    assert st["phase"] == "Failed"
    assert st["reason"] == "spec.bankTransfer.voucherRef: Field required"
    assert w.ledger.vouchers() == []
