"""Account status, Recharge and RechargeReview reconciliation (ledger <-> resources)."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal
from typing import Any

from gpucloud.billing import format_money, to_minor
from gpucloud.clock import Clock
from gpucloud.ledger import (
    IdempotencyConflict,
    Ledger,
    NotFound,
    OrderStatus,
    ReviewRefused,
    VoucherStatus,
)
from gpucloud.recharge import SandboxProvider
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import KubeAPI

log = logging.getLogger("gpucloud.operator.accounts")
Obj = dict[str, Any]


def account_state(balance_minor: int, available_minor: int) -> str:
    """Arrears when the balance is negative; LowBalance when running resources have
    accrued more than what is left; else Active."""
    if balance_minor < 0:
        return "Arrears"
    if available_minor <= 0 < balance_minor or available_minor < 0:
        return "LowBalance"
    return "Active"


def money(minor: int, currency: str) -> str:
    return format_money(minor, currency).split()[0]


class AccountReconciler:
    def __init__(self, kube: KubeAPI, ledger: Ledger, clock: Clock, cfg: OperatorConfig) -> None:
        self.kube, self.ledger, self.clock, self.cfg = kube, ledger, clock, cfg

    # -- Account --------------------------------------------------------------------
    def refresh_account(self, acct: Obj) -> None:
        name = acct["metadata"]["name"]
        spec = acct.get("spec") or {}
        currency = spec.get("currency", "CNY")
        self.ledger.ensure_account(name, currency)
        now = r.second(self.clock.now())
        balance = self.ledger.balance(name)
        available = self.ledger.available_balance(name, now)
        namespaces = set(spec.get("namespaces") or [])
        running = sum(
            1
            for i in self.kube.list_cluster_objects("gpuinstances", ttl=2.0)
            if i["metadata"]["namespace"] in namespaces
            and (i.get("status") or {}).get("phase") in ("Running", "Starting")
        )
        state = account_state(balance, available)
        status = dict(acct.get("status") or {})
        new = {
            "balance": money(balance, currency),
            "available": money(available, currency),
            "currency": currency,
            "runningInstances": running,
            "state": state,
            "observedGeneration": acct["metadata"].get("generation"),
        }
        if state == "Arrears" and not status.get("arrearsSince"):
            new["arrearsSince"] = r.fmt(now)
            new["dataDeletionAt"] = r.fmt(now + timedelta(days=7))
        elif state != "Arrears" and status.get("arrearsSince"):
            new["arrearsSince"] = None
            new["dataDeletionAt"] = None
        if state != status.get("state"):
            cond = b.condition(
                "Funded",
                state == "Active",
                state,
                f"balance {new['balance']} {currency}",
                r.fmt(now),
            )
            new["conditions"] = b.merge_conditions(status.get("conditions"), [cond])
            if status.get("state") is not None or state != "Active":
                self.kube.event(
                    acct,
                    "Normal" if state == "Active" else "Warning",
                    state,
                    f"account is {state}: balance {new['balance']}, available "
                    f"{new['available']} {currency}",
                )
        changes = {k: v for k, v in new.items() if status.get(k) != v}
        if changes:
            self.kube.patch_status("accounts", None, name, changes)

    # -- Recharge -------------------------------------------------------------------
    def reconcile_recharge(self, rc: Obj) -> None:
        meta, spec = rc["metadata"], rc["spec"]
        status = dict(rc.get("status") or {})
        phase = status.get("phase")
        if phase in ("Credited", "Rejected", "Expired", "Failed"):
            return
        now = r.second(self.clock.now())
        account = spec["account"]
        acct = self.kube_account(account)
        if acct is None:
            self._recharge_status(
                rc, {"phase": "Failed", "reason": f"spec.account: Account {account!r} not found"}
            )
            return
        if meta["namespace"] not in (acct.get("spec", {}).get("namespaces") or []):
            self._recharge_status(
                rc,
                {
                    "phase": "Failed",
                    "reason": f"spec.account: namespace {meta['namespace']!r} does not bill "
                    f"to account {account!r}",
                },
            )
            return
        currency = acct.get("spec", {}).get("currency", "CNY")
        self.ledger.ensure_account(account, currency)
        amount = to_minor(Decimal(spec["amount"]), currency)
        if spec["method"] == "Online":
            self._online(rc, account, amount, currency, now)
        else:
            self._bank_transfer(rc, account, amount, now)

    def kube_account(self, name: str) -> Obj | None:
        return next(
            (
                a
                for a in self.kube.list_cluster_objects("accounts", ttl=2.0)
                if a["metadata"]["name"] == name
            ),
            None,
        )

    def _recharge_status(self, rc: Obj, changes: Obj) -> None:
        status = rc.get("status") or {}
        changes = {k: v for k, v in changes.items() if status.get(k) != v}
        if changes:
            meta = rc["metadata"]
            self.kube.patch_status("recharges", meta["namespace"], meta["name"], changes)
            if "phase" in changes:
                self.kube.event(
                    rc,
                    "Warning"
                    if changes["phase"] in ("Failed", "Rejected", "Expired")
                    else "Normal",
                    changes["phase"],
                    changes.get("reason") or f"recharge is {changes['phase']}",
                )

    def _online(self, rc: Obj, account: str, amount: int, currency: str, now: Any) -> None:
        order_id = f"rc-{rc['metadata']['uid']}"
        try:
            order = self.ledger.get_order(order_id)
        except NotFound:
            order = self.ledger.create_order(
                account,
                amount,
                (rc["spec"].get("online") or {}).get("provider", "sandbox"),
                now + timedelta(seconds=self.cfg.order_ttl_s),
                order_id=order_id,
            )
        if order.status is OrderStatus.PENDING and now >= order.expires_at:
            self.ledger.expire_orders(now)
            order = self.ledger.get_order(order_id)
        # The URL encodes no secret: the sandbox provider only signs callbacks.
        url = (
            SandboxProvider(b"unused-for-urls", self.cfg.pay_base_url)
            .create_payment(order.order_id, order.amount_minor, currency, order.expires_at)
            .url
        )
        changes: Obj = {
            "orderId": order.order_id,
            "paymentURL": url,
            "expiresAt": r.fmt(order.expires_at),
        }
        if order.status is OrderStatus.PAID:
            changes |= {"phase": "Credited", "creditedAt": r.fmt(order.paid_at or now)}
        elif order.status is OrderStatus.EXPIRED:
            changes |= {"phase": "Expired", "reason": "the order expired unpaid"}
        else:
            changes["phase"] = "AwaitingPayment"
        self._recharge_status(rc, changes)

    def _bank_transfer(self, rc: Obj, account: str, amount: int, now: Any) -> None:
        bt = rc["spec"]["bankTransfer"]
        ref = bt.get("voucherRef")
        try:
            voucher = self.ledger.submit_voucher(
                account,
                amount,
                bt["payer"],
                bt["bank"],
                bt["transferNumber"],
                ref.removeprefix("sha256:") if ref else None,
                now,
            )
        except IdempotencyConflict as exc:
            self._recharge_status(rc, {"phase": "Failed", "reason": str(exc)})
            return
        changes: Obj = {"orderId": voucher.voucher_id}
        if voucher.status is VoucherStatus.APPROVED:
            changes |= {"phase": "Credited", "creditedAt": r.fmt(voucher.reviewed_at or now)}
        elif voucher.status is VoucherStatus.REJECTED:
            changes |= {"phase": "Rejected", "reason": voucher.reason or "rejected"}
        else:
            changes["phase"] = "AwaitingReview"
        self._recharge_status(rc, changes)

    # -- RechargeReview -------------------------------------------------------------
    def reconcile_review(self, review: Obj) -> None:
        """Carry out an admin's decision exactly once: the ledger refuses a second review,
        and a refusal that matches this decision means it was already applied (an
        interrupted earlier pass)."""
        status = review.get("status") or {}
        if status.get("applied"):
            return
        spec = review["spec"]
        ref = spec["rechargeRef"]
        rc = self.kube.get_namespaced_object("recharges", ref["namespace"], ref["name"])
        if rc is None or not (rc.get("status") or {}).get("orderId"):
            return  # not there yet, or the voucher is not submitted yet: retry later
        if rc["spec"]["method"] != "BankTransfer":
            self._review_status(review, False, "only bank transfers are reviewed")
            return
        approve = spec["decision"] == "Approve"
        reviewer = (review["metadata"].get("annotations") or {}).get(
            "gpucloud.dev/reviewer", "cluster-admin"
        )
        now = r.second(self.clock.now())
        voucher_id = rc["status"]["orderId"]
        try:
            voucher = self.ledger.review_voucher(
                voucher_id, approve, reviewer, spec.get("reason") or "", now
            )
        except ReviewRefused:
            voucher = self.ledger.get_voucher(voucher_id)
            wanted = VoucherStatus.APPROVED if approve else VoucherStatus.REJECTED
            if voucher.status is not wanted:
                self._review_status(
                    review, False, f"the voucher was already {voucher.status.value}"
                )
                return
        self.kube.patch_status(
            "rechargereviews",
            None,
            review["metadata"]["name"],
            {
                "applied": True,
                "appliedAt": r.fmt(voucher.reviewed_at or now),
                "reviewer": voucher.reviewer or reviewer,
            },
        )
        self.kube.event(review, "Normal", "Applied", f"voucher {voucher_id} {voucher.status.value}")
        self.reconcile_recharge(rc)

    def _review_status(self, review: Obj, applied: bool, message: str) -> None:
        now = r.fmt(r.second(self.clock.now()))
        cond = b.condition("Applied", applied, "NotApplied", message, now)
        self.kube.patch_status(
            "rechargereviews",
            None,
            review["metadata"]["name"],
            {
                "applied": applied,
                "conditions": b.merge_conditions(
                    (review.get("status") or {}).get("conditions"), [cond]
                ),
            },
        )
