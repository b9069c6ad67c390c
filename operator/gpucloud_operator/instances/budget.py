"""Budgets of the instance's account (docs/budgets.md): a start that would take a
budget past its monthly amount is refused (``_budget_rule``, applied by admission under
the admission lock), and with ``enforcement: StopPayAsYouGo`` a metered (pay-as-you-go,
spot) instance stops once its account's or namespace's month is spent
(``_budget_stop``), settled by the second like any stop; paid package terms run on.
The account pass predicts the instant a StopPayAsYouGo budget is spent and wakes the
instance's pass then (``gpucloud_operator.runout``), so the stop lands at that second,
not at the next tick. The decisions are ``gpucloud_operator.budgets``; this room reads
the ledger for them."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from gpucloud.billing import BillingError, BillingMode, Decision, minor_exponent, one_hour_exact
from gpucloud.crd.account import Budget
from gpucloud_operator import budgets as bu
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass, log

BudgetCheck = Callable[[Decision | None], str | None]


class Budgets(Core):
    """A start refused by a budget; a metered instance stopped by one."""

    def _budget_of(self, p: Pass) -> tuple[Budget, list[bu.Scope]] | None:
        """The account's budget and the scopes that cover the instance's namespace (the
        account's and the namespace's own), or None (no budget, or enforcement None)."""
        budget = p.account_spec.budget if p.account_spec is not None else None
        if budget is None:
            return None
        try:
            scopes = [s for s in bu.scopes(budget, p.currency) if s.covers(p.ns)]
        except BillingError as exc:  # the account pass reports it (Valid)
            log.warning("budget of account %s not applied: %s", p.account, exc)
            return None
        if budget.enforcement == bu.NONE or not scopes:
            return None
        return budget, scopes

    def _spent(self, p: Pass, scopes: list[bu.Scope]) -> dict[str | None, int]:
        """Spent this month in each scope, from the ledger (not the Account's status,
        which lags by up to an account interval)."""
        month = bu.month_of(p.now)
        posted = self.ledger.spent_by_resource(p.account, month.start, month.end)
        unposted = {
            res: u.total_minor for res, u in self._unposted_by_resource(p.account, p.now).items()
        }
        return {s.namespace: bu.scope_spent(posted, unposted, s.namespace) for s in scopes}

    def _start_cost(self, p: Pass, decision: Decision | None) -> tuple[Fraction, str]:
        """What a start adds to the month (exact minor units), and what it is: one hour of
        a metered instance (the one-hour rule's figure), or the package term it buys (the
        money rule's decision; None: a paid term covers it, nothing is added)."""
        assert p.pb is not None
        mode = r.mode_of(p.billing_key)
        if mode is BillingMode.PACKAGE:
            cost = decision.needed_minor if decision is not None else 0
            return Fraction(cost), f"the {p.billing_key} term of {p.resource}"
        hour = one_hour_exact(p.pb, p.product, p.count, mode=mode, storage_gib=p.quota)
        return hour * 10 ** minor_exponent(p.currency), f"one hour of {p.resource}"

    def _budget_rule(self, p: Pass) -> BudgetCheck | None:
        """Read before the admission lock (ledger reads are not made under it): the check
        the admission applies to the start's money decision, or None without a budget."""
        found = self._budget_of(p)
        if found is None:
            return None
        _, scopes = found
        spent = self._spent(p, scopes)
        month = bu.month_of(p.now)

        def check(decision: Decision | None) -> str | None:
            cost, what = self._start_cost(p, decision)
            for scope in scopes:
                why = bu.start_refusal(
                    scope, p.account, spent[scope.namespace], cost, p.currency, month, what
                )
                if why is not None:
                    if not _refused_by_budget(p):  # once per refusal, not per recheck
                        self.counters.budget_refusals.labels(account=p.account).inc()
                    return why
            return None

        return check

    def _budget_stop(self, p: Pass) -> bool:
        """StopPayAsYouGo: stop an active metered instance once a budget covering it is
        spent. The Account's status says so first (cheap); the ledger confirms (a larger
        budget or a new month the status does not show yet saves the instance). True:
        stopped, nothing else to do this pass."""
        if p.phase not in r.ACTIVE_PHASES or p.phase == "Stopping":
            return False
        mode = r.mode_of(p.status.get("billingMode") or p.billing_key)
        if mode is BillingMode.PACKAGE or not _status_exceeded(p):
            return False
        found = self._budget_of(p)
        if found is None or found[0].enforcement != bu.STOP_PAYG:
            return False
        scopes = found[1]
        spent = self._spent(p, scopes)
        over = next((s for s in scopes if bu.stop_due(spent[s.namespace], s)), None)
        if over is None:
            return False
        month = bu.month_of(p.now)
        message = (
            f"stopped: the budget of {over.label(p.account)} for {month} is spent "
            f"({bu.percent(spent[over.namespace], over.monthly_minor)}%) and its enforcement "
            "is StopPayAsYouGo; raise spec.budget, then start it again"
        )
        self._stop(p, "Stopped", "BudgetExceeded", message)
        self._patch(p, {"haltedGeneration": p.meta.get("generation")})
        return True


def _status_exceeded(p: Pass) -> bool:
    """The Account's status shows a budget covering the instance exceeded this month."""
    st = p.acct_status.get("budget") or {}
    if st.get("month") != str(bu.month_of(p.now)):
        return False
    if st.get("state") == bu.EXCEEDED:
        return True
    return any(
        n.get("namespace") == p.ns and n.get("state") == bu.EXCEEDED
        for n in st.get("namespaces") or []
    )


def _refused_by_budget(p: Pass) -> bool:
    """The instance is already Refused by a budget (a recheck on a tick)."""
    return p.phase == "Refused" and any(
        c.get("type") == "Ready" and c.get("reason") == "BudgetExceeded"
        for c in p.status.get("conditions") or []
    )
