"""Budgets: the pure decisions (no I/O, ``now`` passed in). See docs/budgets.md.

- A budget is per calendar month in UTC (``gpucloud.billing.statement.Period``, the
  statements' month). A *scope* is the whole account or one of its namespaces.
- *Spent* in a scope: what the ledger posted in the month against the scope's resources,
  charges net of refunds, by each entry's time (``Ledger.spent_by_resource``), plus what
  its runs accrued and the ledger has not posted yet (``Ledger.unposted_by_resource``);
  never below zero. A resource belongs to the namespace its name starts with
  (``<ns>/<name>``, ``model/<ns>/<name>``).
- Tiers: each ``notifyAtPercent`` below 100 is a warning tier; 100 (exceeded) is always a
  tier. A tier is reached when ``spent * 100 >= tier * monthly`` (exact integers); the
  percent shown is ``spent * 100 // monthly``, so a tier is reached exactly when the
  percent shown is at least the tier.
- Notices: once per tier, scope and month. A pass that finds several tiers newly reached
  sends one notice, for the highest, and counts the ones below it as sent (a jump from
  40% to 90% says "80%", not "50%" then "80%").
- Hard limit: a start is refused when the scope's spent plus the start's cost (one hour
  of a metered instance, or the package term it buys) would exceed the budget; with
  ``StopPayAsYouGo`` running metered (pay-as-you-go, spot) instances stop once spent
  reaches the budget, at that second: the account pass predicts it and wakes them
  (``gpucloud_operator.runout``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

from gpucloud.billing import format_money, parse_amount
from gpucloud.billing.statement import Period
from gpucloud.crd.account import Budget

OK, WARNING, EXCEEDED = "Ok", "Warning", "Exceeded"
FULL = 100  # the exceeded tier
NONE, REFUSE_STARTS, STOP_PAYG = "None", "RefuseStarts", "StopPayAsYouGo"


def month_of(now: datetime) -> Period:
    """The budget month of ``now``: its calendar month in UTC."""
    utc = now.astimezone(UTC)
    return Period(utc.year, utc.month)


def namespace_of(resource: str | None) -> str | None:
    """The namespace a ledger resource belongs to: ``<ns>/<name>`` (instances, cloud
    disks, images) or ``model/<ns>/<name>[#online]`` (models); None for other names."""
    if not resource:
        return None
    parts = resource.split("/")
    if parts[0] == "model":
        parts = parts[1:]
    return parts[0] if len(parts) >= 2 and parts[0] else None


@dataclass(frozen=True)
class Scope:
    """One budget: the account's (``namespace`` None) or one namespace's."""

    namespace: str | None
    monthly_minor: int

    def label(self, account: str) -> str:
        if self.namespace is None:
            return f"account {account!r}"
        return f"namespace {self.namespace!r} of account {account!r}"

    def covers(self, namespace: str) -> bool:
        return self.namespace is None or self.namespace == namespace


def scopes(budget: Budget | None, currency: str) -> list[Scope]:
    """The account's budget first, then the namespaces'; BillingError (naming the field)
    for an amount finer than the currency's minor unit (a JPY budget of 10.5)."""
    if budget is None:
        return []
    out = []
    if budget.monthly is not None:
        out.append(Scope(None, parse_amount(budget.monthly, currency, "spec.budget.monthly")))
    for i, nb in enumerate(budget.namespaces or ()):
        field = f"spec.budget.namespaces[{i}].monthly"
        out.append(Scope(nb.namespace, parse_amount(nb.monthly, currency, field)))
    return out


def warning_tiers(notify_at_percent: Iterable[int]) -> tuple[int, ...]:
    """The warning tiers, ascending (100 is the exceeded tier, never a warning)."""
    return tuple(sorted({t for t in notify_at_percent if 0 < t < FULL}))


def scope_spent(
    posted: Mapping[str | None, int], unposted: Mapping[str, int], namespace: str | None
) -> int:
    """Spent in a scope (``namespace`` None: the account): the month's posted spending
    by resource plus the unposted accrual by resource, never below zero."""
    total = sum(
        amount
        for res, amount in (*posted.items(), *unposted.items())
        if namespace is None or namespace_of(res) == namespace
    )
    return max(0, total)


def percent(spent_minor: int, monthly_minor: int) -> int:
    """Whole percent of the budget spent, rounded down."""
    return spent_minor * 100 // monthly_minor


def reached(spent_minor: int, monthly_minor: int, warnings: Sequence[int]) -> int:
    """The highest tier reached (100 once spent >= monthly), 0 when none."""
    shown = percent(spent_minor, monthly_minor)
    return max((t for t in (*warnings, FULL) if shown >= t), default=0)


def state_of(tier: int) -> str:
    return EXCEEDED if tier >= FULL else WARNING if tier > 0 else OK


@dataclass(frozen=True)
class Reading:
    """One scope this pass: its figures, and the notice to send now (if any)."""

    scope: Scope
    spent_minor: int
    percent: int
    tier: int  # the highest tier reached, 0 when none
    notified: int  # the highest tier notified this month, after this pass
    due: int | None  # the tier to notify now

    @property
    def state(self) -> str:
        return state_of(self.tier)


def read(scope: Scope, spent_minor: int, warnings: Sequence[int], notified: int) -> Reading:
    """``notified``: the highest tier already notified this month (0 for a new month)."""
    tier = reached(spent_minor, scope.monthly_minor, warnings)
    due = tier if tier > notified else None
    return Reading(
        scope,
        spent_minor,
        percent(spent_minor, scope.monthly_minor),
        tier,
        max(tier, notified),
        due,
    )


def describe(r: Reading, account: str, currency: str, month: Period) -> str:
    return (
        f"{r.scope.label(account)} spent {format_money(r.spent_minor, currency)} of its "
        f"{format_money(r.scope.monthly_minor, currency)} budget in {month} ({r.percent}%)"
    )


def enforcement_text(enforcement: str) -> str:
    return {
        NONE: "enforcement None: notices only",
        REFUSE_STARTS: "new starts are refused until the next month or a larger budget",
        STOP_PAYG: "new starts are refused and running pay-as-you-go and spot instances are "
        "stopped; paid package terms keep running",
    }[enforcement]


def start_refusal(
    scope: Scope,
    account: str,
    spent_minor: int,
    cost_minor: Fraction,
    currency: str,
    month: Period,
    what: str,
) -> str | None:
    """Why a start that adds ``cost_minor`` (exact minor units: one hour of a metered
    instance, or the package term) is refused by the scope's budget, or None. A start
    that adds nothing (a paid package term) is never refused; spent + cost equal to the
    budget is allowed."""
    if cost_minor <= 0 or spent_minor + cost_minor <= scope.monthly_minor:
        return None
    cost = format_money(-(-cost_minor.numerator // cost_minor.denominator), currency)
    return (
        f"the budget of {scope.label(account)} would be exceeded: spent "
        f"{format_money(spent_minor, currency)} of {format_money(scope.monthly_minor, currency)}"
        f" in {month}, and {what} adds {cost}; raise spec.budget or wait for the next month"
    )


def stop_due(spent_minor: int, scope: Scope) -> bool:
    """StopPayAsYouGo: metered instances of the scope stop once spent reaches the budget."""
    return spent_minor >= scope.monthly_minor
