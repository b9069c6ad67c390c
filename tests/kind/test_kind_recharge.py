"""Recharges through the real API and operator pods: a corporate bank transfer with its
voucher, approved by an admin's RechargeReview, credited exactly once."""

from __future__ import annotations

import json

from gpucloud.testing.kindrelease import API_AUDIENCE, KindHarness


def test_bank_transfer_with_voucher_is_credited_once_after_review(h: KindHarness) -> None:
    h.apply(
        "Recharge",
        "transfer",
        {
            "account": h.account,
            "method": "BankTransfer",
            "amount": "1234.56",
            "bankTransfer": {
                "payer": "ACME Research Co., Ltd.",
                "bank": "Bank of Example",
                "transferNumber": f"TRF-{h.ns}",
                "voucherRef": "sha256:" + "ab" * 32,
            },
        },
    )
    st = h.wait_phase("recharges", "transfer", "AwaitingReview")
    assert st["orderId"] and h.balance() == 0
    # the tenant cannot review (RBAC), and nobody can review under another's name (the
    # chart's admission policy): both refused by the real API server, naming the rule
    rc = h.kind.get_json("recharge", "transfer", "-n", h.ns)
    forged = {
        "apiVersion": "gpucloud.dev/v1alpha1", "kind": "RechargeReview",
        "metadata": {"name": "forged", "annotations": {"gpucloud.dev/reviewer": "someone"}},
        "spec": {"rechargeRef": {"namespace": h.ns, "name": "transfer",
                                 "uid": rc["metadata"]["uid"]},
                 "amount": "1234.56", "voucherId": st["orderId"], "decision": "Approve"},
    }  # fmt: skip
    tenant = h.kind.kubectl(f"--as={h.user}", "create", "-f", "-", input=json.dumps(forged),
                            check=False)  # fmt: skip
    assert tenant.returncode != 0 and "forbidden" in tenant.stderr.lower()
    admin = h.kind.kubectl("create", "-f", "-", input=json.dumps(forged), check=False)
    assert admin.returncode != 0 and "gpucloud.dev/reviewer" in admin.stderr
    review = h.review("transfer")
    h.wait_phase("recharges", "transfer", "Credited")
    assert h.balance() == 1234_56
    assert [e["amount"] for e in h.entries() if e["kind"] == "recharge"] == [1234_56]
    # the review applied twice (re-applied, operator resync) credits nothing more
    h.kind.kubectl("annotate", "rechargereview", review, "again=1")
    h.wait(lambda: h.kind.get_json("rechargereview", review).get("status"),
           "the review's status")  # fmt: skip
    assert h.balance() == 1234_56
    h.kind.kubectl("delete", "rechargereview", review, "--wait=false")

    # the tenant's own ServiceAccount reads the balance through the API: its account
    # because the Account lists its namespace and RBAC lets it create Recharges there
    balance_path = f"/v1/accounts/{h.account}/balance"
    code, body = h.api_get(balance_path, h.token(audience=API_AUDIENCE))
    assert (code, body["balance_minor"]) == (200, 1234_56), body
    # a ServiceAccount with no right to pay in that namespace does not, and is told why
    code, body = h.api_get(balance_path, h.token("default", "kube-system", API_AUDIENCE))
    assert code == 403 and "Recharges" in body["detail"], body
