"""Account: a tenant; its namespaces bill to one prepaid balance."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpucloud.crd.common import (
    DNS_LABEL,
    MINOR_UNIT,
    POSITIVE,
    Currency,
    DecimalStr,
    StatusBase,
    Timestamp,
    money,
    optional,
)
from gpucloud.crd.k8s import Cel, ListType, Spec, immutable
from gpucloud.crd.schema import Column, Definition

Namespace = Annotated[str, Field(description="Namespace name.", pattern=DNS_LABEL, max_length=63)]


class Webhook(Spec):
    url: str = Field(
        description="Notifications are POSTed here as JSON.",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
    )


# A budget amount: positive, in the account currency, never finer than its minor unit.
BudgetAmount = Annotated[DecimalStr, POSITIVE, MINOR_UNIT]
Percent = Annotated[int, Field(ge=1, le=100)]
Hours = Annotated[int, Field(ge=1, le=8760)]
DEFAULT_NOTIFY_PERCENT = [50, 80, 100]
DEFAULT_RUNWAY_HOURS = (24, 3, 1)


class NamespaceBudget(Spec):
    namespace: Namespace
    monthly: BudgetAmount = Field(
        description=money("What the namespace may spend per calendar month (UTC).")
    )


class Budget(Spec):
    """A monthly budget (docs/budgets.md): notices at the tiers of notifyAtPercent, and
    the hard limit of ``enforcement`` at 100%."""

    cel = (
        Cel(
            "has(self.monthly) || has(self.namespaces)",
            "set monthly, namespaces, or both",
            ".monthly",
            lambda s: s.monthly is not None or s.namespaces is not None,
        ),
    )
    monthly: BudgetAmount | None = Field(
        default=None,
        description=money(
            "What the whole account may spend per calendar month (UTC): every charge the "
            "ledger posts, GPU time, storage, packages and models."
        ),
    )
    notify_at_percent: Annotated[list[Percent], ListType("set")] = Field(
        default=DEFAULT_NOTIFY_PERCENT,
        description="Notify (event, condition, webhook) once per month when the month's "
        "spending reaches each of these percentages of the budget; 100 is the "
        "BudgetExceeded notice, sent whether listed or not.",
        max_length=10,
    )
    enforcement: Literal["None", "RefuseStarts", "StopPayAsYouGo"] = Field(
        default="RefuseStarts",
        description="At 100%: None (notices only), RefuseStarts (a start whose first hour "
        "would exceed the budget is refused) or StopPayAsYouGo (also stop running "
        "pay-as-you-go and spot instances; paid package terms keep running).",
    )
    namespaces: Annotated[list[NamespaceBudget] | None, ListType("map", ("namespace",))] = Field(
        default=None,
        description="Budgets of single namespaces of the account, each checked like the "
        "account's (same tiers and enforcement).",
        max_length=64,
    )


Minutes = Annotated[int, Field(ge=5, le=10080)]


class IdlePolicy(Spec):
    """Idle-GPU detection for the account's instances (docs/idle.md): an instance whose
    GPUs all stay at most this busy is idle; notices and (opt-in) a stop follow."""

    cel = (
        Cel(
            "self.notifyAfterMinutes >= self.idleAfterMinutes",
            "notifyAfterMinutes must be at least idleAfterMinutes",
            ".notifyAfterMinutes",
            lambda s: s.notify_after_minutes >= s.idle_after_minutes,
        ),
        Cel(
            "!has(self.stopAfterMinutes) || self.stopAfterMinutes >= self.idleAfterMinutes",
            "stopAfterMinutes must be at least idleAfterMinutes",
            ".stopAfterMinutes",
            lambda s: s.stop_after_minutes is None or s.stop_after_minutes >= s.idle_after_minutes,
        ),
    )
    utilization_percent: int = Field(
        default=5,
        description="A sampled second with GPU utilization at most this (percent) is idle.",
        ge=0,
        le=100,
    )
    memory_mib: int | None = Field(
        default=None,
        alias="memoryMiB",
        description="If set, a second is idle only if the GPU also holds at most this much "
        "memory (MiB): a loaded model then keeps the instance busy. Absent: memory is not "
        "considered.",
        ge=0,
        le=2**30,
    )
    grace_minutes: int = Field(
        default=10,
        description="Minutes after each start that never count as idle (images load, data "
        "is staged).",
        ge=0,
        le=1440,
    )
    idle_after_minutes: Minutes = Field(
        default=10,
        description="An instance is idle (status.idleSince, condition Idle) once all its "
        "GPUs have been idle this long without a break.",
    )
    notify_after_minutes: Minutes = Field(
        default=30,
        description="Event, condition and webhook (instance.idle) once per idle stretch "
        "after this long.",
    )
    stop_after_minutes: Minutes | None = Field(
        default=None,
        description="Opt-in: stop the instance (its data kept, billed to the second of the "
        "stop) after this long idle. Package instances are never stopped (their term is "
        "paid). Absent: never stopped.",
    )


def _budget_namespaces_listed(spec: AccountSpec) -> bool:
    if spec.budget is None or spec.budget.namespaces is None:
        return True
    return all(b.namespace in spec.namespaces for b in spec.budget.namespaces)


class AccountSpec(Spec):
    cel = (
        Cel(
            "!has(self.budget) || !has(self.budget.namespaces) || "
            "self.budget.namespaces.all(b, b.namespace in self.namespaces)",
            "each budget.namespaces[].namespace must be one of spec.namespaces",
            ".budget.namespaces",
            _budget_namespaces_listed,
        ),
    )
    display_name: str | None = Field(
        default=None, description="Human-readable tenant name.", max_length=128
    )
    namespaces: Annotated[list[Namespace], ListType("set")] = Field(
        description="Namespaces whose resources bill to this account.", max_length=256
    )
    currency: Annotated[Currency, immutable("currency")] = Field(
        default="CNY", description="Currency of the balance: one the billing core rounds."
    )
    instance_limit: int = Field(
        default=5, description="Most instances that may run at once.", ge=0, le=10000
    )
    runway_notice_hours: Annotated[list[Hours] | None, ListType("set")] = Field(
        default=None,
        description="Notify once per tier when the balance lasts less than this many hours "
        "at the current burn rate (default 24, 3, 1); the largest is the low-balance "
        "warning.",
        max_length=10,
        min_length=1,
    )
    low_balance_warning_hours: Hours | None = Field(
        default=None,
        description="Deprecated: runwayNoticeHours [N]. Ignored when runwayNoticeHours is set.",
    )
    budget: Budget | None = None
    idle: IdlePolicy | None = None
    webhook: Webhook | None = None

    def runway_tiers(self) -> tuple[int, ...]:
        """The runway notice tiers, largest first (the deprecated single field as one)."""
        if self.runway_notice_hours:
            return tuple(sorted(set(self.runway_notice_hours), reverse=True))
        if self.low_balance_warning_hours is not None:
            return (self.low_balance_warning_hours,)
        return DEFAULT_RUNWAY_HOURS


class NamespaceBudgetStatus(Spec):
    namespace: str = Field(description="The namespace.")
    monthly: str = Field(description="Its monthly budget.")
    spent: str = Field(description="What it spent this month.")
    percent: int = Field(description="spent / monthly, in whole percent (rounded down).", ge=0)
    state: Literal["Ok", "Warning", "Exceeded"] = Field(description="Budget state.")
    notified_percent: int | None = optional("The highest tier notified this month.")


class BudgetStatus(Spec):
    month: str = Field(description="The calendar month (UTC) the figures are for, YYYY-MM.")
    spent: str = Field(
        description="What the account spent this month: charges posted in it, net of "
        "refunds, plus what its runs accrued and the ledger has not posted yet."
    )
    monthly: str | None = optional("The account's monthly budget.")
    percent: int | None = Field(
        default=None, description="spent / monthly, in whole percent (rounded down).", ge=0
    )
    state: Literal["Ok", "Warning", "Exceeded"] | None = optional("The account budget's state.")
    notified_percent: int | None = optional("The highest tier notified this month.")
    namespaces: list[NamespaceBudgetStatus] | None = optional("Per-namespace budgets.")


class RunwayStatus(Spec):
    hours_left: str | None = optional(
        "How long the available balance lasts at the current burn rate; absent when "
        "nothing is billed per hour."
    )
    cost_per_hour: str = Field(description="The current burn rate, per hour.")
    noticed_hours: int | None = optional("The lowest runway tier notified in the current episode.")


class AccountStatus(StatusBase):
    state: Literal["Active", "LowBalance", "Arrears"] | None = optional("Account state.")
    balance: str | None = optional("Balance in the account currency.")
    available: str | None = optional(
        "Balance minus what running resources accrued and stopped runs still owe."
    )
    currency: str | None = optional("Currency.")
    running_instances: int | None = Field(default=None, description="Instances running now.", ge=0)
    arrears_since: Timestamp | None = optional("Start of the current arrears.")
    data_deletion_at: Timestamp | None = optional("When data is deleted if arrears go on.")
    budget: BudgetStatus | None = optional("This month's spending against the budget.")
    runway: RunwayStatus | None = optional("How long the balance lasts (runway notices).")
    cost_per_hour: str | None = Field(
        default=None,
        description="What the account spends per hour now (its burn rate), in the account "
        "currency, exact; the console's runway is the available balance over it.",
        pattern=r"^[0-9]+(\.[0-9]+)?$",
        max_length=80,
    )


DEFINITION = Definition(
    kind="Account",
    plural="accounts",
    scope="Cluster",
    short_names=["acct"],
    description="A tenant: its namespaces bill to one prepaid balance.",
    spec=AccountSpec,
    status=AccountStatus,
    columns=[
        Column("State", ".status.state"),
        Column("Balance", ".status.balance"),
        Column("Available", ".status.available"),
        Column("Currency", ".status.currency"),
        Column("Running", ".status.runningInstances", "integer"),
        Column("Budget%", ".status.budget.percent", "integer"),
        Column("Cost/h", ".status.costPerHour", priority=1),
    ],
)
