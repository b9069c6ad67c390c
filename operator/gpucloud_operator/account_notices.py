"""Budget and runway notices of one Account pass (docs/budgets.md): the status fields,
conditions, Events, webhook calls and metrics. The decisions are pure
(``gpucloud_operator.budgets``, ``arrears.runway_notice``); this module reads the ledger
for the month's spending and sends what they decide. Conditions and status remember what
was sent, so a notice goes out once per tier (per scope and month for budgets, per
episode for runway)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any

from gpucloud.billing import BillingError, format_price, from_minor
from gpucloud.crd.account import AccountSpec
from gpucloud.ledger import Ledger
from gpucloud_operator import arrears as ar
from gpucloud_operator import budgets as bu
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.instances import KubeAPI
from gpucloud_operator.metrics import NoticeCounters
from gpucloud_operator.notify import Notifier, payload

Obj = dict[str, Any]


def _old(status: Obj) -> dict[str, tuple[str, str]]:
    """Condition type -> (status, reason)."""
    return {
        c["type"]: (str(c.get("status")), str(c.get("reason")))
        for c in status.get("conditions") or []
    }


def hours_text(hours: Decimal) -> str:
    """Hours left for people, rounded down to a tenth (2.96 h is "2.9", never "3.0")."""
    return str(hours.quantize(Decimal("0.1"), rounding=ROUND_DOWN))


@dataclass(frozen=True)
class BudgetPass:
    """What an account pass learnt of its budget: ``status.budget``, its conditions, spent
    / monthly by namespace (``""``: the account's) for the metrics, and the readings of
    the scopes whose enforcement is StopPayAsYouGo (the account reconciler predicts when
    each is spent and wakes the instances of a spent one: ``runout``)."""

    status: Obj | None = None
    conditions: list[Obj] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    stops: tuple[bu.Reading, ...] = ()


class AccountNotices:
    def __init__(
        self,
        kube: KubeAPI,
        ledger: Ledger,
        notifier: Notifier,
        counters: NoticeCounters | None = None,
    ) -> None:
        self.kube, self.ledger, self.notifier = kube, ledger, notifier
        self.counters = counters or NoticeCounters()

    # -- budgets ----------------------------------------------------------------------
    def budget(
        self,
        acct: Obj,
        spec: AccountSpec | None,
        status: Obj,
        currency: str,
        now: datetime,
        unposted: Mapping[str, int],
        url: str,
    ) -> BudgetPass:
        """The month's spending per scope: notices, conditions and status (``BudgetPass``)."""
        old = _old(status)
        stamp = r.fmt(now)
        budget = spec.budget if spec is not None else None
        try:
            scopes = bu.scopes(budget, currency)
        except BillingError as exc:
            msg = str(exc)
            if old.get("Valid") != ("False", "InvalidBudget"):
                self.kube.event(acct, "Warning", "InvalidBudget", msg)
            return BudgetPass(conditions=[b.condition("Valid", False, "InvalidBudget", msg, stamp)])
        conds: list[Obj] = []
        if spec is not None and old.get("Valid") == ("False", "InvalidBudget"):
            conds.append(b.condition("Valid", True, "Valid", "the spec is valid", stamp))
        if budget is None or not scopes:
            for type_ in ("BudgetWarning", "BudgetExceeded"):
                if old.get(type_, ("",))[0] == "True":
                    conds.append(b.condition(type_, False, "NoBudget", "no budget is set", stamp))
            return BudgetPass(conditions=conds)
        name = acct["metadata"]["name"]
        month = bu.month_of(now)
        posted = self.ledger.spent_by_resource(name, month.start, month.end)
        prev = status.get("budget") or {}
        notified: dict[str | None, int] = {}
        if prev.get("month") == str(month):  # a new month starts with no notice sent
            notified[None] = int(prev.get("notifiedPercent") or 0)
            for ns in prev.get("namespaces") or []:
                notified[ns["namespace"]] = int(ns.get("notifiedPercent") or 0)
        warnings = bu.warning_tiers(budget.notify_at_percent)
        readings = [
            bu.read(
                sc,
                bu.scope_spent(posted, unposted, sc.namespace),
                warnings,
                notified.get(sc.namespace, 0),
            )
            for sc in scopes
        ]
        for reading in readings:
            if reading.due is not None:
                self._budget_notice(acct, reading, budget.enforcement, currency, month, now, url)
        conds += self._budget_conditions(
            readings, warnings, budget.enforcement, name, currency, month, now
        )
        out = self._budget_status(readings, bu.scope_spent(posted, unposted, None), currency, month)
        ratios = {
            rd.scope.namespace or "": rd.spent_minor / rd.scope.monthly_minor for rd in readings
        }
        stops = tuple(readings) if budget.enforcement == bu.STOP_PAYG else ()
        return BudgetPass(out, conds, ratios, stops)

    def _budget_notice(
        self,
        acct: Obj,
        rd: bu.Reading,
        enforcement: str,
        currency: str,
        month: Any,
        now: datetime,
        url: str,
    ) -> None:
        name = acct["metadata"]["name"]
        assert rd.due is not None
        text = bu.describe(rd, name, currency, month)
        figures = {
            "namespace": rd.scope.namespace,
            "month": str(month),
            "percent": rd.due,
            "spent": str(from_minor(rd.spent_minor, currency)),
            "monthly": str(from_minor(rd.scope.monthly_minor, currency)),
            "currency": currency,
        }
        if rd.due >= bu.FULL:
            msg = f"{text}: budget exceeded; {bu.enforcement_text(enforcement)}"
            self.kube.event(acct, "Warning", "BudgetExceeded", msg)
            body = payload("budget.exceeded", name, msg, now, enforcement=enforcement, **figures)
        else:
            msg = f"{text}: the {rd.due}% budget notice"
            self.kube.event(acct, "Warning", "BudgetWarning", msg)
            body = payload("budget.threshold", name, msg, now, **figures)
        self.notifier.notify(url, body)
        self.counters.budget_notices.labels(percent=str(rd.due)).inc()

    @staticmethod
    def _budget_conditions(
        readings: list[bu.Reading],
        warnings: tuple[int, ...],
        enforcement: str,
        account: str,
        currency: str,
        month: Any,
        now: datetime,
    ) -> list[Obj]:
        stamp = r.fmt(now)
        over = [rd for rd in readings if rd.state == bu.EXCEEDED]
        if over:
            msg = "; ".join(bu.describe(rd, account, currency, month) for rd in over)
            exceeded = b.condition(
                "BudgetExceeded", True, "Exceeded", f"{msg}: {bu.enforcement_text(enforcement)}",
                stamp,
            )  # fmt: skip
        else:
            exceeded = b.condition(
                "BudgetExceeded", False, "WithinBudget", f"within budget in {month}", stamp
            )
        # every scope at or past a warning tier (an exceeded one too), named by the highest
        warned = [rd for rd in readings if warnings and rd.percent >= warnings[0]]
        if warned:
            top = max(t for t in warnings if any(rd.percent >= t for rd in warned))
            msg = "; ".join(bu.describe(rd, account, currency, month) for rd in warned)
            warning = b.condition("BudgetWarning", True, f"Reached{top}Percent", msg, stamp)
        else:
            warning = b.condition(
                "BudgetWarning", False, "BelowThresholds", f"no notice tier reached in {month}",
                stamp,
            )  # fmt: skip
        return [exceeded, warning]

    @staticmethod
    def _budget_status(
        readings: list[bu.Reading], account_spent: int, currency: str, month: Any
    ) -> Obj:
        def money(minor: int) -> str:
            return str(from_minor(minor, currency))

        out: Obj = {"month": str(month), "spent": money(account_spent)}
        namespaces = []
        for rd in readings:
            figures = {
                "monthly": money(rd.scope.monthly_minor),
                "percent": rd.percent,
                "state": rd.state,
                "notifiedPercent": rd.notified or None,
            }
            if rd.scope.namespace is None:
                out |= figures
            else:
                spent = money(rd.spent_minor)
                namespaces.append({"namespace": rd.scope.namespace, "spent": spent, **figures})
        if namespaces:
            out["namespaces"] = [{k: v for k, v in n.items() if v is not None} for n in namespaces]
        return {k: v for k, v in out.items() if v is not None}

    # -- runway -----------------------------------------------------------------------
    def runway(
        self,
        acct: Obj,
        tiers: tuple[int, ...],
        status: Obj,
        verdict: ar.Assessment,
        burn: Decimal,
        figures: Obj,
        now: datetime,
        url: str,
    ) -> tuple[Obj, list[Obj]]:
        """(status.runway, conditions): a RunwayNotice per tier, once per episode."""
        old = _old(status)
        stamp = r.fmt(now)
        currency = figures["currency"]
        before = (status.get("runway") or {}).get("noticedHours")
        noticed, due = ar.runway_notice(verdict.hours_left, tiers, before, verdict.in_arrears)
        hours = verdict.hours_left
        out: Obj = {"costPerHour": format_price(burn, currency).split()[0]}
        if hours is not None:
            out["hoursLeft"] = hours_text(hours)
        if noticed is not None:
            out["noticedHours"] = noticed
        conds: list[Obj] = []
        if due is not None:
            assert hours is not None
            name = acct["metadata"]["name"]
            msg = (
                f"about {hours_text(hours)} h of balance left at the current burn rate "
                f"({out['costPerHour']} {currency}/h): below the {due} h notice tier; "
                "recharge to avoid a shutdown"
            )
            conds.append(b.condition("RunwayNotice", True, f"Below{due}h", msg, stamp))
            self.kube.event(acct, "Warning", "RunwayNotice", msg)
            self.notifier.notify(
                url,
                payload(
                    "account.runway", name, msg, now, tier=due, hoursLeft=out["hoursLeft"],
                    costPerHour=out["costPerHour"], **figures,
                ),
            )  # fmt: skip
            self.counters.runway_notices.labels(tier=str(due)).inc()
        elif noticed is None and old.get("RunwayNotice", ("",))[0] == "True":
            lasts = "nothing is billed per hour" if hours is None else (
                f"the balance lasts {hours_text(hours)} h at the current burn rate"
            )  # fmt: skip
            msg = f"runway back above {max(tiers)} h: {lasts}"
            conds.append(b.condition("RunwayNotice", False, "Funded", msg, stamp))
        return out, conds
