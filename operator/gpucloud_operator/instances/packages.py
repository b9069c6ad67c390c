"""Packages and billing modes: a term is charged upfront when the run first runs (its key
``package:<uid>:<seq>``, the balance checked against other reservations), reminded of
once 7 days or less remain, renewed at expiry (``autoRenew``) or the instance shut down
at the expiry instant; leaving a package mid-term (mode switch, arrears) refunds the
unused part once per term (``package-refund:<uid>:<seq>``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gpucloud.billing import (
    BillingMode,
    PackagePeriod,
    Term,
    leave_package,
    package_price,
    package_purchase_decision,
    to_minor,
)
from gpucloud.ledger import EntryKind, NotFound
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import Obj


class Packages(Core):
    """Package terms and billing mode switches."""

    def _buy_term(self, p: Pass, period: Any, start: datetime) -> bool:
        """Charge one package term upfront; False when the balance does not cover it."""
        assert p.pb is not None
        terms = p.terms
        seq = len(terms) + 1
        key = f"package:{p.uid}:{seq}"
        price = to_minor(package_price(p.pb, p.product, period, p.count), p.pb.currency)
        try:
            self.ledger.get_entry(key)
            replay = True
        except NotFound:
            replay = False
        if not replay:
            reserved = self._reserved(p, self._listed_reservations(p))
            available = self.ledger.available_balance(p.account, p.now, reserved_minor=reserved)
            decision = package_purchase_decision(available, p.product, p.count, period, p.pb)
            if not decision.allowed:
                self._event(p, "Warning", "InsufficientBalance", decision.message)
                return False
        end = start + self.cfg.package_length(period)
        self.ledger.post_entry(
            p.account,
            EntryKind.CHARGE,
            -price,
            key,
            resource=p.resource,
            memo=f"{period} package {b.gpu_summary(p.product, p.count)}, term {seq} "
            f"{r.fmt(start)} -> {r.fmt(end)}",
            at=p.now,
            meta={"seq": seq, "period": str(period)},
        )
        crash_point("term-charged")
        with self._guard:
            self._reservations.pop(p.uid, None)  # charged now: no longer reserved
        term = {
            "seq": seq,
            "period": str(period),
            "start": r.fmt(start),
            "end": r.fmt(end),
            "prepaidMinor": price,
        }
        self._patch(p, {"packageTerms": [*terms, term], "packageExpiresAt": r.fmt(end)})
        self._event(p, "Normal", "PackagePurchased", f"term {seq} paid, expires {r.fmt(end)}")
        return True

    def _package_rules(self, p: Pass) -> bool:
        """Reminder, expiry and auto-renewal of a running package instance. True when the
        instance was shut down."""
        key = p.status.get("billingMode") or ""
        if not key.startswith("Package") or not p.terms:
            return False
        last = p.terms[-1]
        end = r.parse(last["end"])
        assert end is not None
        while p.now >= end:
            # shut down at the expiry itself, even if this pass comes later (the operator
            # was down): the GPUs were paid until then, not after
            at = self._stop_instant(p, end)
            if not p.model.billing.auto_renew:
                message = f"the package expired at {r.fmt(end)}"
                self._stop_at(p, at, "Expired", "PackageExpired", message)
                return True
            if not self._buy_term(p, r.period_of(key), end):
                self._stop_at(
                    p,
                    at,
                    "Expired",
                    "RenewalFailed",
                    f"auto-renewal at {r.fmt(end)} failed: the balance does not cover the "
                    "next term; recharge and start the instance again",
                )
                return True
            self._event(p, "Normal", "PackageRenewed", f"renewed from {r.fmt(end)}")
            end = r.parse(p.terms[-1]["end"]) or end
        if r.reminder_due(p.now, end, self.cfg.reminder_lead) and p.status.get(
            "reminderSentFor"
        ) != r.fmt(end):
            message = f"the package expires at {r.fmt(end)}" + (
                " and renews automatically" if p.model.billing.auto_renew else ""
            )
            self._patch(
                p,
                {
                    "reminderSentFor": r.fmt(end),
                    "conditions": self._conditions(
                        p, ("PackageExpiring", True, "ExpiresSoon", message)
                    ),
                },
            )
            self._event(p, "Warning", "PackageExpiring", message)
        return False

    def _switch_mode(self, p: Pass) -> bool:
        """Leave the mode in force at ``now`` and enter the one in the spec. Package ->
        other: the used time at the pay-as-you-go rate is kept and the rest refunded (the
        billing core's rule). Metered -> other: the meter is closed (settled to the
        second). False when the new mode could not be entered (the instance stopped)."""
        assert p.pb is not None
        old = p.status.get("billingMode") or ""
        new = p.billing_key
        at = p.now
        if old.startswith("Package"):
            term = r.active_term(p.terms, p.now)
            if term is not None:
                at = self._leave_term(p, term)
        elif p.status.get("meterId"):
            at = self._close_meter(p, p.status["meterId"], p.now)
        if r.mode_of(new) is BillingMode.PACKAGE:
            if not self._buy_term(p, r.period_of(new), at):
                self._stop(
                    p,
                    "Refused",
                    "InsufficientBalance",
                    f"cannot switch to {new}: the balance does not cover the package",
                )
                return False
        else:
            meter_id = f"gpu:{p.uid}:{p.status.get('runs')}:{int(at.timestamp())}"
            self._patch(p, {"meterId": meter_id, "meterSince": r.fmt(at)})
            self._patch(p, {"billingMode": new})
            self._ensure_meter(p)
        self._patch(
            p,
            {
                "billingMode": new,
                "conditions": self._conditions(
                    p, ("Billing", True, new.replace("/", ""), f"billed as {new}")
                ),
            },
        )
        self.kube.patch_pod_labels(p.ns, b.pod_name(p.name), {b.MODE_LABEL: p.model.billing.mode})
        self._event(p, "Normal", "BillingModeChanged", f"{old} -> {new} at {r.fmt(at)}")
        return True

    def _keep_mode(self, p: Pass, why: str) -> None:
        """A switch to a mode the PriceBook does not offer for the product: the instance
        keeps running in the mode in force; the Billing condition and an event say why."""
        key = p.status.get("billingMode") or ""
        message = f"{why}; still billed as {key}"
        cond = next((c for c in p.status.get("conditions") or [] if c["type"] == "Billing"), {})
        if cond.get("message") == message:
            return
        conds = self._conditions(p, ("Billing", False, "NotOffered", message))
        self._patch(p, {"conditions": conds})
        self._event(p, "Warning", "NotOffered", message)

    def _leave_idle_package(self, p: Pass) -> None:
        """A stopped instance whose billing leaves a package mid-term gets the unused
        part refunded at once (the seed's mode-switch rule), not at its next start."""
        old = p.status.get("billingMode") or ""
        new = p.billing_key
        term = r.active_term(p.terms, p.now)
        if not old.startswith("Package") or old == new or term is None:
            return
        at = self._leave_term(p, term)
        self._patch(p, {"billingMode": new})
        self._event(p, "Normal", "BillingModeChanged", f"{old} -> {new} at {r.fmt(at)}")

    def _leave_term(
        self, p: Pass, term: Obj, at: datetime | None = None, arrears: bool = False
    ) -> datetime:
        """Refund the unused part of ``term`` left at ``at`` (default: now) and end the
        term there; idempotent per term (the refund key)."""
        assert p.pb is not None
        key = f"package-refund:{p.uid}:{term['seq']}"
        start, end = r.parse(term["start"]), r.parse(term["end"])
        assert start is not None and end is not None
        try:
            entry = self.ledger.get_entry(key)  # a replay: keep the first switch instant
            at = r.parse(entry.meta.get("switched_at")) or at or p.now
        except NotFound:
            at = at or p.now
            period = PackagePeriod(term["period"])
            settlement = leave_package(
                p.pb, p.product, p.count, Term(period, start, end), term["prepaidMinor"], at
            )
            if settlement.refund_minor:
                self.ledger.post_entry(
                    p.account,
                    EntryKind.REFUND,
                    settlement.refund_minor,
                    key,
                    resource=p.resource,
                    memo=f"package term {term['seq']} "
                    f"{'shut down by arrears' if arrears else 'left'} at {r.fmt(at)}: "
                    f"{settlement.used_seconds} s used at the pay-as-you-go rate",
                    at=at,
                    meta={
                        "switched_at": r.fmt(at),
                        "used_minor": settlement.used_minor,
                        **({"arrears": True} if arrears else {}),
                    },
                )
        terms = [dict(t) for t in p.terms]
        terms[-1]["end"] = r.fmt(at)
        self._patch(p, {"packageTerms": terms, "packageExpiresAt": None})
        return at
