"""Account status, Recharge and RechargeReview reconciliation (ledger <-> resources)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gpucloud import ownership
from gpucloud.billing import (
    CURRENCY_EXPONENTS,
    BillingError,
    PriceBook,
    available_balance,
    format_money,
    parse_amount,
    to_minor,
)
from gpucloud.clock import Clock
from gpucloud.ledger import (
    IdempotencyConflict,
    Ledger,
    OrderStatus,
    ReviewRefused,
    VoucherStatus,
)
from gpucloud.recharge import SandboxProvider
from gpucloud_operator import arrears as ar
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import KubeAPI
from gpucloud_operator.metrics import AccountMetrics
from gpucloud_operator.notify import Notifier

log = logging.getLogger("gpucloud.operator.accounts")
Obj = dict[str, Any]


def _condition(status: Obj, type_: str) -> tuple[str, str] | None:
    """(status, message) of a condition, or None."""
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status")), str(c.get("message"))
    return None


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


REVIEWER = "gpucloud.dev/reviewer"
SUBMITTER = "gpucloud.dev/submitter"


def submitter(rc: Obj) -> str:
    """Who submitted a Recharge, for the audit trail: the annotation the chart's
    admission policy makes equal to the creating user, else the Recharge itself."""
    meta = rc["metadata"]
    user = (meta.get("annotations") or {}).get(SUBMITTER)
    return str(user) if user else f"recharge:{meta['namespace']}/{meta['name']}"


def review_mismatch(review: Obj, rc: Obj) -> str | None:
    """What differs between what the admin saw (pinned in the review) and the Recharge
    and voucher now; None when they match."""
    spec = review["spec"]
    pinned = spec["rechargeRef"].get("uid")
    if pinned != rc["metadata"].get("uid"):
        return (
            f"spec.rechargeRef.uid: the review is for Recharge {pinned!r}, "
            f"{spec['rechargeRef']['name']!r} is now {rc['metadata'].get('uid')!r}"
        )
    try:
        same_amount = Decimal(str(spec.get("amount"))) == Decimal(str(rc["spec"]["amount"]))
    except ArithmeticError:
        same_amount = False
    if not same_amount:
        return (
            f"spec.amount: the review is for {spec.get('amount')}, the Recharge is for "
            f"{rc['spec']['amount']}"
        )
    if spec.get("voucherId") != (rc.get("status") or {}).get("orderId"):
        return (
            f"spec.voucherId: the review is for voucher {spec.get('voucherId')!r}, the "
            f"Recharge's is {(rc.get('status') or {}).get('orderId')!r}"
        )
    return None


class AccountReconciler:
    def __init__(
        self,
        kube: KubeAPI,
        ledger: Ledger,
        clock: Clock,
        cfg: OperatorConfig,
        notifier: Notifier | None = None,
        metrics: AccountMetrics | None = None,
    ) -> None:
        self.kube, self.ledger, self.clock, self.cfg = kube, ledger, clock, cfg
        self.notifier = notifier or Notifier()
        self.metrics = metrics

    # -- arrears (docs/arrears.md) ----------------------------------------------------
    def _assess(
        self,
        acct: Obj,
        spec: Obj,
        balance: int,
        available: int,
        owed: int,
        currency: str,
        now: datetime,
        namespaces: set[str],
    ) -> tuple[ar.Assessment, Decimal]:
        """The verdict, and the burn rate (currency units per hour) it was made with."""

        def mine(plural: str) -> list[Obj]:
            return [
                o
                for o in self.kube.list_cluster_objects(plural, ttl=2.0)
                if o["metadata"].get("namespace") in namespaces
            ]

        # stopped runs not yet settled count as owed (``Ledger.unposted``; the ledger, not
        # the cached, lagging instance status, says which ones): the available balance
        # already deducts them, the balance the rules judge does too
        balance -= owed
        burn = Decimal(0)
        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is not None:
            try:
                pb = PriceBook.from_resource(pb_obj)
                burn = ar.account_burn_rate(
                    pb, mine("gpuinstances"), mine("clouddisks"), mine("images"), now
                )
            except BillingError as exc:  # a bad price book must not stop enforcement
                log.error("burn rate of %s: %s", acct["metadata"]["name"], exc)
        status = acct.get("status") or {}
        verdict = ar.assess(
            balance_minor=balance,
            available_minor=available,
            currency=currency,
            burn_per_hour=burn,
            warning_hours=int(spec.get("lowBalanceWarningHours", ar.DEFAULT_WARNING_HOURS)),
            arrears_since=r.parse(status.get("arrearsSince")),
            now=now,
            retention=self.cfg.arrears_retention,
        )
        return verdict, burn

    def webhook_url(self, acct: Obj) -> str:
        return ((acct.get("spec") or {}).get("webhook") or {}).get("url") or self.cfg.webhook_url

    def _notify_transitions(
        self, acct: Obj, status: Obj, verdict: ar.Assessment, new: Obj, now: datetime
    ) -> list[Obj]:
        """Event + condition + webhook on entering/leaving arrears and on the low-balance
        warning; conditions remember what was already sent, so each is sent once."""
        name = acct["metadata"]["name"]
        old = {c["type"]: c.get("status") for c in status.get("conditions") or []}
        conds: list[Obj] = []
        url = self.webhook_url(acct)
        figures = {"balance": new["balance"], "available": new["available"]}
        hours = verdict.hours_left
        warn = verdict.state in (ar.LOW, ar.ARREARS)
        if warn and old.get("LowBalanceWarning") != "True":
            lasts = "nothing left" if hours is None or hours <= 0 else f"about {hours:.1f} h left"
            msg = (
                f"balance {new['balance']} {new['currency']} is low: {lasts} at the current "
                "burn rate; recharge to avoid a shutdown"
            )
            conds.append(b.condition("LowBalanceWarning", True, "LowBalance", msg, r.fmt(now)))
            self.kube.event(acct, "Warning", "LowBalanceWarning", msg)
            self.notifier.notify(url, ar.payload("LowBalanceWarning", name, msg, now, **figures))
        elif not warn and old.get("LowBalanceWarning") == "True":
            conds.append(
                b.condition(
                    "LowBalanceWarning", False, "Funded", "balance is sufficient", r.fmt(now)
                )
            )
        if verdict.in_arrears and old.get("Arrears") != "True":
            msg = (
                f"account is in arrears (balance {new['balance']} {new['currency']}): running "
                f"instances are shut down; data is kept until {new['dataDeletionAt']}, then "
                "deleted unless the debt is cleared"
            )
            conds.append(b.condition("Arrears", True, "Arrears", msg, r.fmt(now)))
            self.kube.event(acct, "Warning", "ArrearsShutdown", msg)
            self.notifier.notify(
                url,
                ar.payload(
                    "Arrears",
                    name,
                    msg,
                    now,
                    arrearsSince=new["arrearsSince"],
                    dataDeletionAt=new["dataDeletionAt"],
                    **figures,
                ),
            )
        elif not verdict.in_arrears and old.get("Arrears") == "True":
            msg = "arrears cleared: the data deletion countdown stopped; start instances again"
            conds.append(b.condition("Arrears", False, "Cleared", msg, r.fmt(now)))
            self.kube.event(acct, "Normal", "ArrearsCleared", msg)
            self.notifier.notify(url, ar.payload("ArrearsCleared", name, msg, now, **figures))
        return conds

    # -- Account --------------------------------------------------------------------
    def refresh_account(self, acct: Obj) -> None:
        name = acct["metadata"]["name"]
        spec = acct.get("spec") or {}
        currency = spec.get("currency", "CNY")
        now = r.second(self.clock.now())
        status = dict(acct.get("status") or {})
        if currency not in CURRENCY_EXPONENTS:  # the CRD's enum refuses it; older objects
            self._invalid_currency(acct, status, currency, now)
            return
        self.ledger.ensure_account(name, currency)
        balance = self.ledger.balance(name)
        unposted = self.ledger.unposted(name, now)
        available = available_balance(balance, [unposted.open_minor], [unposted.closed_minor])
        # this body is fresher than the cached list (a new Account may not be in it yet)
        accounts = [
            *(a for a in self.kube.list_cluster_objects("accounts", ttl=2.0)
              if a["metadata"]["name"] != name),
            acct,
        ]  # fmt: skip
        namespaces = ownership.owned(accounts, name)
        running = sum(
            1
            for i in self.kube.list_cluster_objects("gpuinstances", ttl=2.0)
            if i["metadata"]["namespace"] in namespaces
            and (i.get("status") or {}).get("phase") in ("Running", "Starting")
        )
        # arrears, low-balance warning and their notifications (gpucloud_operator.arrears)
        verdict, burn = self._assess(
            acct, spec, balance, available, unposted.closed_minor, currency, now, namespaces
        )
        if self.metrics is not None:
            self.metrics.observe(
                name,
                currency,
                balance_minor=balance,
                available_minor=available,
                cost_per_hour=burn,
                in_arrears=verdict.in_arrears,
                data_deletion_at=verdict.data_deletion_at,
            )
        state = verdict.state
        new = {
            "balance": money(balance, currency),
            "available": money(available, currency),
            "currency": currency,
            "runningInstances": running,
            "state": state,
            "observedGeneration": acct["metadata"].get("generation"),
            "arrearsSince": r.fmt(verdict.arrears_since) if verdict.arrears_since else None,
            "dataDeletionAt": r.fmt(verdict.data_deletion_at) if verdict.data_deletion_at else None,
            # the burn rate the verdict used: the console's runway divides by it
            "costPerHour": format(burn, "f"),
        }
        conds: list[Obj] = []
        if state != status.get("state"):
            conds.append(
                b.condition(
                    "Funded",
                    state == "Active",
                    state,
                    f"balance {new['balance']} {currency}",
                    r.fmt(now),
                )
            )
            if status.get("state") is not None or state != "Active":
                self.kube.event(
                    acct,
                    "Normal" if state == "Active" else "Warning",
                    state,
                    f"account is {state}: balance {new['balance']}, available "
                    f"{new['available']} {currency}",
                )
        conds += self._notify_transitions(acct, status, verdict, new, now)
        conds += self._namespace_conflicts(acct, status, ownership.conflicts(accounts, name), now)
        if conds:
            new["conditions"] = b.merge_conditions(status.get("conditions"), conds)
        changes = {k: v for k, v in new.items() if status.get(k) != v}
        if changes:
            self.kube.patch_status("accounts", None, name, changes)

    def _invalid_currency(self, acct: Obj, status: Obj, currency: str, now: datetime) -> None:
        known = ", ".join(sorted(CURRENCY_EXPONENTS))
        msg = f"spec.currency: {currency!r} is not a currency the billing core rounds ({known})"
        cond = b.condition("Valid", False, "UnsupportedCurrency", msg, r.fmt(now))
        if _condition(status, "Valid") != ("False", msg):
            self.kube.event(acct, "Warning", "UnsupportedCurrency", msg)
            conditions = b.merge_conditions(status.get("conditions"), [cond])
            self.kube.patch_status("accounts", None, acct["metadata"]["name"], {
                "conditions": conditions
            })  # fmt: skip

    def _namespace_conflicts(
        self, acct: Obj, status: Obj, found: list[ownership.Conflict], now: datetime
    ) -> list[Obj]:
        """NamespaceConflict: True naming each namespace and the Account that keeps it."""
        name = acct["metadata"]["name"]
        old = _condition(status, "NamespaceConflict")
        if found:
            msg = "; ".join(c.message(name) for c in found)
            if old != ("True", msg):
                self.kube.event(acct, "Warning", "NamespaceConflict", msg)
            return [b.condition("NamespaceConflict", True, "NamespaceClaimed", msg, r.fmt(now))]
        if old is not None and old[0] == "True":
            msg = "every namespace in spec.namespaces bills to this Account"
            return [b.condition("NamespaceConflict", False, "NoConflict", msg, r.fmt(now))]
        return []

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
        owner = ownership.owners(self.kube.list_cluster_objects("accounts", ttl=2.0)).get(
            meta["namespace"]
        )
        if owner != account:
            elsewhere = f" (it bills to Account {owner!r}, which claimed it first)" if owner else ""
            self._recharge_status(
                rc,
                {
                    "phase": "Failed",
                    "reason": f"spec.account: namespace {meta['namespace']!r} does not bill "
                    f"to account {account!r}{elsewhere}",
                },
            )
            return
        currency = acct.get("spec", {}).get("currency", "CNY")
        self.ledger.ensure_account(account, currency)
        try:  # never rounded: 10.123 is refused, not credited as 10.12
            amount = parse_amount(spec["amount"], currency, "spec.amount")
        except BillingError as exc:
            if not status.get("orderId"):
                self._recharge_status(rc, {"phase": "Failed", "reason": str(exc)})
                return
            # submitted to the ledger before amounts were checked: finish it as it was
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
        ref = f"rc-{rc['metadata']['uid']}"  # one order per Recharge, whatever its name
        order = self.ledger.find_order(account, ref)
        if order is None:
            order = self.ledger.create_order(
                account,
                amount,
                (rc["spec"].get("online") or {}).get("provider", "sandbox"),
                now + timedelta(seconds=self.cfg.order_ttl_s),
                client_ref=ref,
                actor=submitter(rc),
            )
        if order.status is OrderStatus.PENDING and now >= order.expires_at:
            self.ledger.expire_orders(now)
            order = self.ledger.get_order(order.order_id)
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
        """Submit the voucher once (its id goes to status.orderId), then follow it. The
        voucher reference is required (the CRD says so too): without it nothing is
        submitted and the Recharge fails naming the field."""
        bt = rc["spec"]["bankTransfer"]
        submitted = (rc.get("status") or {}).get("orderId")
        try:
            if submitted:
                voucher = self.ledger.get_voucher(submitted)
            elif not bt.get("voucherRef"):
                self._recharge_status(
                    rc,
                    {
                        "phase": "Failed",
                        "reason": "spec.bankTransfer.voucherRef: required: upload the transfer "
                        "voucher and give its sha256:<hex> reference for the admin to review",
                    },
                )
                return
            else:
                voucher = self.ledger.submit_voucher(
                    account,
                    amount,
                    bt["payer"],
                    bt["bank"],
                    bt["transferNumber"],
                    bt["voucherRef"].removeprefix("sha256:"),
                    now,
                    submitter=submitter(rc),
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
        """Carry out an admin's decision exactly once, on exactly what the admin saw: the
        review pins the Recharge's UID, amount and voucher id (``spec.rechargeRef.uid``,
        ``spec.amount``, ``spec.voucherId``) and is refused on any mismatch (a Recharge
        deleted and recreated under the same name is another Recharge). The reviewer is
        the annotation ``gpucloud.dev/reviewer``, which the chart's admission policy
        makes equal to the Kubernetes user who created the review; a review without it
        is refused, and so is one by the Recharge's submitter. The ledger refuses a
        second review; a refusal that matches this decision means it was already
        applied (an interrupted earlier pass)."""
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
        reviewer = (review["metadata"].get("annotations") or {}).get(REVIEWER)
        problem = review_mismatch(review, rc)
        if problem is None and not reviewer:
            problem = f"metadata.annotations[{REVIEWER!r}]: required (the reviewing user)"
        if problem is None and reviewer == submitter(rc):
            problem = f"{reviewer!r} submitted this recharge: another admin must review it"
        if problem is not None:
            if status.get("conditions") is None or all(
                c.get("message") != problem for c in status["conditions"]
            ):
                self._review_status(review, False, problem)
                self.kube.event(review, "Warning", "Refused", problem)
            return
        assert reviewer is not None
        approve = spec["decision"] == "Approve"
        now = r.second(self.clock.now())
        voucher_id = rc["status"]["orderId"]
        currency = self._currency_of(rc)
        expect = to_minor(Decimal(spec["amount"]), currency)
        try:
            voucher = self.ledger.review_voucher(
                voucher_id, approve, reviewer, spec.get("reason") or "", now, expect_amount=expect
            )
        except ReviewRefused as exc:
            voucher = self.ledger.get_voucher(voucher_id)
            wanted = VoucherStatus.APPROVED if approve else VoucherStatus.REJECTED
            if exc.reason != "already_reviewed" or voucher.status is not wanted:
                self._review_status(review, False, str(exc))
                return
        self.kube.patch_status(
            "rechargereviews",
            None,
            review["metadata"]["name"],
            {
                "applied": True,
                "appliedAt": r.fmt(voucher.reviewed_at or now),
                "reviewer": voucher.reviewer or reviewer,
                # the voucher file the decision was made on (the ledger's record of it)
                "voucherRef": f"sha256:{voucher.file_sha256}" if voucher.file_sha256 else None,
            },
        )
        self.kube.event(review, "Normal", "Applied", f"voucher {voucher_id} {voucher.status.value}")
        self.reconcile_recharge(rc)

    def _currency_of(self, rc: Obj) -> str:
        acct = self.kube_account(rc["spec"]["account"]) or {}
        return str((acct.get("spec") or {}).get("currency", "CNY"))

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
