"""Account, Recharge and RechargeReview specs are read through their CRD models: the
model's defaults apply, and a spec the model refuses (fed to the reconciler as a plain
dict, as an object stored before a schema tightened or written around the API server
would arrive) is refused naming the field and the rule, with nothing submitted to,
credited in or charged through the ledger for it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.notify import Notifier
from opworld import NS, World

from gpucloud.ledger import NotFound, VoucherStatus

VOUCHER = "sha256:" + "cd" * 32
BT = {"payer": "ACME", "bank": "Bank", "transferNumber": "TRF-1", "voucherRef": VOUCHER}


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str | None, str]] = []

    def notify(self, url: str | None, payload: dict) -> bool:
        self.sent.append((url, payload["type"]))
        return True


def rec(w: World, notifier: Notifier | None = None) -> AccountReconciler:
    return AccountReconciler(w.kube, w.ledger, w.clock, w.cfg, notifier)


def condition(obj: dict, type_: str) -> dict:
    (cond,) = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_]
    return cond


# -- Account ----------------------------------------------------------------------------
def test_account_defaults_come_from_the_model(world: World) -> None:
    """Only namespaces given: the ledger account is made in the model's currency (CNY)."""
    w = world
    acct = w.kube.add_cluster(
        "accounts", {"metadata": {"name": "plain"}, "spec": {"namespaces": ["p"]}}
    )
    rec(w).refresh_account(acct)
    assert w.ledger.get_account("plain").currency == "CNY"
    assert acct["status"]["currency"] == "CNY" and acct["status"]["state"] == "Active"


@pytest.mark.parametrize("hours", [None, 1])
def test_the_low_balance_warning_reads_its_hours_and_webhook_through_the_model(
    world: World, hours: int | None
) -> None:
    """Two hours of balance (L40S 5.20/h + 50 GiB x 0.0004/h = 5.22/h): below the model's
    default runway tiers (24, 3, 1 h) a LowBalance warning and a runway notice go to the
    Account's own webhook; with lowBalanceWarningHours 1 (one tier) it is not low yet."""
    w = world
    w.fund(10_44)
    acct = w.kube.cluster[("accounts", "acme")]
    acct["spec"]["webhook"] = {"url": "https://hooks.example/acme"}
    if hours is not None:
        acct["spec"]["lowBalanceWarningHours"] = hours
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    assert w.status("job")["phase"] == "Running"
    sent = Recorder()
    rec(w, sent).refresh_account(acct)
    if hours is None:
        assert acct["status"]["state"] == "LowBalance"
        assert sorted(sent.sent) == [
            ("https://hooks.example/acme", "LowBalanceWarning"),
            ("https://hooks.example/acme", "account.runway"),
        ]
    else:
        assert acct["status"]["state"] == "Active" and sent.sent == []


def test_a_refused_account_spec_is_invalid_spec_and_makes_no_ledger_account(world: World) -> None:
    w = world
    acct = w.kube.add_cluster(
        "accounts",
        {"metadata": {"name": "lax"}, "spec": {"namespaces": ["lax"], "lowBalanceWarningHours": 0}},
    )
    r = rec(w)
    r.refresh_account(acct)
    cond = condition(acct, "Valid")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert cond["message"] == (
        "spec.lowBalanceWarningHours: Input should be greater than or equal to 1"
    )
    assert w.kube.reasons("lax") == ["InvalidSpec"]
    assert "balance" not in acct["status"]
    with pytest.raises(NotFound):
        w.ledger.get_account("lax")
    r.refresh_account(acct)
    assert w.kube.reasons("lax") == ["InvalidSpec"]  # said once
    # fixed: the account is made and the condition says so
    acct["spec"]["lowBalanceWarningHours"] = 2
    r.refresh_account(acct)
    cond = condition(acct, "Valid")
    assert (cond["status"], cond["reason"]) == ("True", "SpecAccepted")
    assert acct["status"]["balance"] == "0.00" and w.ledger.get_account("lax").currency == "CNY"


# -- the instances of an Account whose spec is refused ---------------------------------
def test_no_instance_starts_for_an_account_the_model_refuses(world: World) -> None:
    w = world
    w.kube.add_cluster(
        "accounts",
        {"metadata": {"name": "pounds"}, "spec": {"namespaces": ["uk"], "currency": "GBP"}},
    )
    spec = {"gpu": {"product": "NVIDIA-L40S"}, "billing": {"mode": "PayAsYouGo"}}
    w.kube.add_namespaced(
        "gpuinstances", {"metadata": {"name": "job", "namespace": "uk"}, "spec": spec}
    )
    w.rec.reconcile_named("uk", "job")
    st = w.kube.instance("uk", "job")["status"]
    assert st["phase"] == "Refused"
    assert st["message"].startswith(
        "Account 'pounds' has a spec the models refuse (spec.currency: Input should be"
    )
    assert condition(w.kube.instance("uk", "job"), "Ready")["reason"] == "InvalidAccount"
    with pytest.raises(NotFound):
        w.ledger.get_account("pounds")  # nothing to charge, nothing charged


def test_what_runs_bills_on_and_nothing_new_starts_once_an_account_is_refused(
    world: World,
) -> None:
    """The instance limit is read through the model (acme's 3); an Account that later
    breaks its schema (a limit above 10000) admits no new instance, while the one that
    runs goes on billing to the ledger account it had: usage is neither lost nor moved."""
    w = world
    w.fund(100_000_00)
    w.instance("first", "NVIDIA-L40S")
    w.tick()
    assert w.status("first")["phase"] == "Running"
    w.kube.cluster[("accounts", "acme")]["spec"]["instanceLimit"] = 20_000
    w.instance("second", "NVIDIA-L40S")
    w.tick("second")
    st = w.status("second")
    assert st["phase"] == "Refused"
    assert "(spec.instanceLimit: Input should be less than or equal to 10000)" in st["message"]
    assert "InvalidAccount" in w.kube.reasons("second")
    before = w.ledger.balance("acme")
    w.clock.advance(timedelta(hours=2, minutes=1))
    w.tick("first")
    assert w.status("first")["phase"] == "Running"
    assert w.ledger.balance("acme") < before  # its hours were charged as usual


# -- Recharge ---------------------------------------------------------------------------
def add_recharge(w: World, name: str, spec: dict, ns: str = NS) -> dict:
    meta = {"name": name, "namespace": ns, "annotations": {"gpucloud.dev/submitter": "bob"}}
    return w.kube.add_namespaced("recharges", {"kind": "Recharge", "metadata": meta, "spec": spec})


def stored(w: World, name: str, ns: str = NS) -> dict:
    return w.kube.namespaced[("recharges", ns, name)]


def test_an_online_recharge_without_online_uses_the_models_provider(world: World) -> None:
    w = world
    rc = add_recharge(w, "top", {"account": "acme", "method": "Online", "amount": "19.80"})
    rec(w).reconcile_recharge(rc)
    order = w.ledger.find_order("acme", f"rc-{rc['metadata']['uid']}")
    assert order is not None and order.provider == "sandbox" and order.amount_minor == 19_80
    assert stored(w, "top")["status"]["phase"] == "AwaitingPayment"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"account": "acme", "method": "Online", "amount": "5.00", "bankTransfer": BT},
            "spec.bankTransfer: bankTransfer is only allowed when method is BankTransfer "
            "(rule: self.method != 'Online' || !has(self.bankTransfer))",
        ),
        (
            {"account": "acme", "method": "BankTransfer", "amount": "5.00"},
            "spec.bankTransfer: bankTransfer is required when method is BankTransfer "
            "(rule: self.method != 'BankTransfer' || has(self.bankTransfer))",
        ),
        (
            {"account": "acme", "method": "Online", "amount": 5},
            'spec.amount: a decimal is written as a string: quote it, e.g. "5"',
        ),
        ({"account": "acme", "method": "Cash", "amount": "5.00"}, "spec.method: Input should be"),
    ],
)
def test_a_refused_recharge_fails_naming_the_field_and_credits_nothing(
    world: World, spec: dict, message: str
) -> None:
    w = world
    before = w.ledger.audit_events("acme")
    rc = add_recharge(w, "bad", spec)
    r = rec(w)
    r.reconcile_recharge(rc)
    st = stored(w, "bad")["status"]
    assert st["phase"] == "Failed" and st["reason"].startswith(message)
    cond = condition(stored(w, "bad"), "Valid")
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "InvalidSpec",
        st["reason"],
    )
    assert w.kube.reasons("bad") == ["InvalidSpec"]
    assert w.ledger.find_order("acme", f"rc-{rc['metadata']['uid']}") is None
    assert w.ledger.vouchers() == [] and w.ledger.audit_events("acme") == before
    assert w.ledger.balance("acme") == 0


def test_a_submitted_recharge_whose_spec_is_refused_now_keeps_its_phase(world: World) -> None:
    """Submitted before a schema tightened: the ledger holds the order (a payment may be
    under way), so the phase stays; the condition says what is wrong and no second
    order is made. Paid later (the callback), its status follows the ledger."""
    w = world
    rc = add_recharge(w, "early", {"account": "acme", "method": "Online", "amount": "5.00"})
    r = rec(w)
    r.reconcile_recharge(rc)
    rc = stored(w, "early")
    assert rc["status"]["phase"] == "AwaitingPayment"
    rc["spec"]["bankTransfer"] = BT  # as a later rule would refuse it
    r.reconcile_recharge(rc)
    assert rc["status"]["phase"] == "AwaitingPayment"
    cond = condition(rc, "Valid")
    assert cond["reason"] == "InvalidSpec" and cond["message"].startswith("spec.bankTransfer:")
    assert "InvalidSpec" in w.kube.reasons("early")
    assert [e.action for e in w.ledger.audit_events("acme")].count("order.created") == 1
    w.ledger.settle_order(rc["status"]["orderId"], "txn-1", 5_00, w.clock.now())
    r.reconcile_recharge(rc)
    assert rc["status"]["phase"] == "Credited"
    assert rc["status"]["creditedAt"] == w.clock.now().isoformat().replace("+00:00", "Z")
    assert condition(rc, "Valid")["reason"] == "InvalidSpec"  # still says what is wrong
    assert w.kube.reasons("early").count("InvalidSpec") == 1  # the warning said once


def test_a_submitted_transfer_whose_spec_is_refused_follows_its_review(world: World) -> None:
    """Reviewed through the API (the operator applies no review of a refused Recharge):
    the Recharge shows the ledger's verdict."""
    w = world
    rc = submitted_wire(w)
    rc["spec"]["amount"] = "250.001"  # as a later rule would refuse it
    r = rec(w)
    r.reconcile_recharge(rc)
    assert rc["status"]["phase"] == "AwaitingReview"
    w.ledger.review_voucher(rc["status"]["orderId"], False, "admin:bob", "no such transfer",
                            w.clock.now())  # fmt: skip
    r.reconcile_recharge(rc)
    assert (rc["status"]["phase"], rc["status"]["reason"]) == ("Rejected", "no such transfer")
    assert w.ledger.balance("acme") == 0


def test_a_recharge_to_an_account_the_model_refuses_credits_nothing(world: World) -> None:
    w = world
    w.kube.add_cluster(
        "accounts",
        {"metadata": {"name": "lax"}, "spec": {"namespaces": ["lax-ns"], "instanceLimit": -1}},
    )
    spec = {"account": "lax", "method": "BankTransfer", "amount": "100.00", "bankTransfer": BT}
    rec(w).reconcile_recharge(add_recharge(w, "wire", spec, ns="lax-ns"))
    st = stored(w, "wire", "lax-ns")["status"]
    assert st["phase"] == "Failed"
    assert st["reason"].startswith(
        "spec.account: Account 'lax' has a spec the models refuse (spec.instanceLimit: "
    )
    assert condition(stored(w, "wire", "lax-ns"), "Valid")["reason"] == "InvalidAccount"
    with pytest.raises(NotFound):
        w.ledger.get_account("lax")


# -- RechargeReview ---------------------------------------------------------------------
def submitted_wire(w: World) -> dict:
    rc = add_recharge(w, "wire", {"account": "acme", "method": "BankTransfer", "amount": "250.00",
                                  "bankTransfer": BT})  # fmt: skip
    rec(w).reconcile_recharge(rc)
    rc = stored(w, "wire")
    assert rc["status"]["phase"] == "AwaitingReview"
    return rc


def add_review(w: World, name: str, rc: dict, **spec: object) -> dict:
    pinned = {
        "rechargeRef": {"namespace": NS, "name": "wire", "uid": rc["metadata"]["uid"]},
        "amount": rc["spec"]["amount"],
        "voucherId": rc["status"]["orderId"],
        "decision": "Approve",
    }
    meta = {"name": name, "annotations": {"gpucloud.dev/reviewer": "alice"}}
    return w.kube.add_cluster("rechargereviews", {"metadata": meta, "spec": {**pinned, **spec}})


def review_refused(w: World, name: str) -> dict:
    review = w.kube.cluster[("rechargereviews", name)]
    assert review["status"]["applied"] is False
    return condition(review, "Applied")


def test_a_refused_review_is_not_applied_and_credits_nothing(world: World) -> None:
    w = world
    rc = submitted_wire(w)
    r = rec(w)
    r.reconcile_review(add_review(w, "no-reason", rc, decision="Reject"))
    cond = review_refused(w, "no-reason")
    assert cond["reason"] == "InvalidSpec"
    assert cond["message"] == (
        "spec.reason: reason is required when decision is Reject (rule: self.decision != "
        "'Reject' || (has(self.reason) && size(self.reason) > 0))"
    )
    assert w.kube.reasons("no-reason") == ["InvalidSpec"]
    r.reconcile_review(add_review(w, "no-ref", rc, rechargeRef={"namespace": NS, "name": "wire"}))
    assert review_refused(w, "no-ref")["message"] == "spec.rechargeRef.uid: Field required"
    (voucher,) = w.ledger.vouchers()
    assert voucher.status is VoucherStatus.PENDING and w.ledger.balance("acme") == 0


def test_a_review_of_a_recharge_the_model_refuses_credits_nothing(world: World) -> None:
    """Its voucher stays pending (an admin can still decide it through the API)."""
    w = world
    rc = submitted_wire(w)
    rc["spec"]["amount"] = "250.001"  # stored before the 2-place rule
    rec(w).reconcile_review(add_review(w, "r1", rc))
    cond = review_refused(w, "r1")
    assert cond["reason"] == "InvalidRecharge"
    assert cond["message"].startswith(
        f"Recharge {NS}/wire has a spec the models refuse: spec.amount: must not be finer"
    )
    assert w.kube.reasons("r1") == ["InvalidRecharge"]
    (voucher,) = w.ledger.vouchers()
    assert voucher.status is VoucherStatus.PENDING and w.ledger.balance("acme") == 0


def test_a_valid_review_still_credits_once(world: World) -> None:
    w = world
    rc = submitted_wire(w)
    r = rec(w)
    r.reconcile_review(add_review(w, "ok", rc, amount="250"))  # the same amount, written shorter
    assert w.kube.cluster[("rechargereviews", "ok")]["status"]["applied"] is True
    assert w.ledger.balance("acme") == 250_00
    assert stored(w, "wire")["status"]["phase"] == "Credited"


def test_arrears_are_still_enforced_for_a_refused_account_that_has_a_ledger_account(
    world: World,
) -> None:
    """What runs bills on, so the balance, arrears and the shutdown go on too (the
    model's defaults stand in for what is refused); Valid=False says why."""
    w = world
    w.fund(10_44)  # two hours of L40S 5.20/h + 50 GiB x 0.0004/h
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    acct = w.kube.cluster[("accounts", "acme")]
    acct["spec"]["instanceLimit"] = 20_000
    r = rec(w)
    r.refresh_account(acct)
    assert acct["status"]["state"] == "LowBalance"  # under the default 24 hours
    cond = condition(acct, "Valid")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert cond["message"].startswith("spec.instanceLimit: Input should be less than")
    w.clock.advance(timedelta(hours=2, minutes=1))
    w.tick("job")
    r.refresh_account(acct)
    assert acct["status"]["state"] == "Arrears"
    assert condition(acct, "Valid")["status"] == "False"
    assert w.kube.reasons("acme").count("InvalidSpec") == 1
    w.tick("job")
    assert w.status("job")["phase"] != "Running"  # shut down in arrears, as for any account
