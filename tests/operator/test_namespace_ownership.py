"""A namespace listed by two Accounts bills to the one that claimed it first; the other
gets a NamespaceConflict condition and is not used for it. An Account whose currency the
billing core cannot round gets a condition naming spec.currency."""

from __future__ import annotations

from gpucloud_operator.accounts import AccountReconciler
from opworld import NS, World

from gpucloud import ownership
from gpucloud.ledger import EntryKind

L40S = "NVIDIA-L40S"


def acct(name: str, created: str, *namespaces: str) -> dict:
    meta = {"name": name, "creationTimestamp": created}
    return {"metadata": meta, "spec": {"namespaces": list(namespaces)}}


def test_the_first_claim_wins_whatever_the_list_order_or_the_names() -> None:
    first = acct("zeta", "2026-01-01T00:00:00Z", "shared", "z-only")
    later = acct("alpha", "2026-02-01T00:00:00Z", "shared", "a-only")
    for accounts in ([first, later], [later, first]):
        assert ownership.owners(accounts) == {"shared": "zeta", "z-only": "zeta", "a-only": "alpha"}
        assert ownership.account_for(accounts, "shared") is first
        assert ownership.account_for(accounts, "nowhere") is None
        assert ownership.owned(accounts, "alpha") == {"a-only"}
        assert ownership.conflicts(accounts, "alpha") == [ownership.Conflict("shared", "zeta")]
        assert ownership.conflicts(accounts, "zeta") == []
    # the same second: the name decides, so every replica of the operator agrees
    tie = acct("beta", "2026-01-01T00:00:00Z", "shared")
    assert ownership.owners([first, tie])["shared"] == "beta"
    msg = ownership.Conflict("shared", "zeta").message("alpha")
    assert "spec.namespaces" in msg and "'shared'" in msg and "'zeta'" in msg


def second_account(w: World, **spec: object) -> dict:
    w.kube.cluster[("accounts", "acme")]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    meta = {"name": "aaa-late", "creationTimestamp": "2026-03-01T00:00:00Z"}
    return w.kube.add_cluster(
        "accounts", {"metadata": meta, "spec": {"namespaces": [NS, "own-ns"], **spec}}
    )


def test_the_second_account_gets_a_condition_and_never_the_bill(world: World) -> None:
    w = world
    w.fund(100_00)
    late = second_account(w)
    w.ledger.ensure_account("aaa-late", "CNY")
    w.ledger.post_entry("aaa-late", EntryKind.RECHARGE, 100_00, "f", at=w.clock.now())
    rec = AccountReconciler(w.kube, w.ledger, w.clock, w.cfg)
    rec.refresh_account(late)
    cond = {c["type"]: c for c in late["status"]["conditions"]}["NamespaceConflict"]
    assert cond["status"] == "True" and cond["reason"] == "NamespaceClaimed"
    assert f"namespace {NS!r} is already claimed by Account 'acme'" in cond["message"]
    assert "own-ns" not in cond["message"]
    assert ("aaa-late", "Warning", "NamespaceConflict", cond["message"]) in w.kube.events
    rec.refresh_account(w.kube.cluster[("accounts", "acme")])
    acme_conds = w.kube.cluster[("accounts", "acme")]["status"].get("conditions") or []
    assert "NamespaceConflict" not in {c["type"] for c in acme_conds}
    # an instance in the shared namespace bills to acme, the first claimant
    w.instance("nb", L40S, 1)
    w.tick()
    assert w.status("nb")["phase"] in ("Starting", "Running")
    assert w.ledger.get_meter(w.status("nb")["meterId"]).account == "acme"
    assert w.ledger.balance("aaa-late") == 100_00
    # the conflict resolved: the condition turns False
    late["spec"]["namespaces"] = ["own-ns"]
    rec.refresh_account(late)
    cond = {c["type"]: c for c in late["status"]["conditions"]}["NamespaceConflict"]
    assert cond["status"] == "False" and cond["reason"] == "NoConflict"


def test_a_recharge_to_the_second_account_from_the_shared_namespace_fails(world: World) -> None:
    w = world
    second_account(w)
    rc = w.kube.add_namespaced("recharges", {
        "kind": "Recharge", "metadata": {"name": "r", "namespace": NS},
        "spec": {"account": "aaa-late", "method": "Online", "amount": "19.80"},
    })  # fmt: skip
    AccountReconciler(w.kube, w.ledger, w.clock, w.cfg).reconcile_recharge(rc)
    st = w.kube.namespaced[("recharges", NS, "r")]["status"]
    assert st["phase"] == "Failed"
    assert st["reason"] == (
        f"spec.account: namespace {NS!r} does not bill to account 'aaa-late' (it bills to "
        "Account 'acme', which claimed it first)"
    )


def test_an_unsupported_currency_is_a_condition_naming_the_field(world: World) -> None:
    w = world
    gbp = w.kube.add_cluster(
        "accounts",
        {"metadata": {"name": "pounds"}, "spec": {"namespaces": ["uk"], "currency": "GBP"}},
    )
    rec = AccountReconciler(w.kube, w.ledger, w.clock, w.cfg)
    rec.refresh_account(gbp)
    (cond,) = gbp["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Valid", "False", "InvalidSpec")
    assert cond["message"] == "spec.currency: Input should be 'CNY', 'EUR', 'JPY' or 'USD'"
    assert "balance" not in gbp["status"]  # nothing posted, no ledger account made
    events = [e for e in w.kube.events if e[0] == "pounds"]
    rec.refresh_account(gbp)
    assert [e for e in w.kube.events if e[0] == "pounds"] == events  # warned once
