"""Account: a tenant; its namespaces bill to one prepaid balance."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpucloud.crd.common import (
    DNS_LABEL,
    Currency,
    StatusBase,
    Timestamp,
    optional,
)
from gpucloud.crd.k8s import ListType, Spec, immutable
from gpucloud.crd.schema import Column, Definition

Namespace = Annotated[str, Field(description="Namespace name.", pattern=DNS_LABEL, max_length=63)]


class Webhook(Spec):
    url: str = Field(
        description="Notifications are POSTed here as JSON.",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
    )


class AccountSpec(Spec):
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
    low_balance_warning_hours: int = Field(
        default=24,
        description="Warn when the balance lasts less than this many hours at the current "
        "burn rate.",
        ge=1,
        le=8760,
    )
    webhook: Webhook | None = None


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
        Column("Cost/h", ".status.costPerHour", priority=1),
    ],
)
