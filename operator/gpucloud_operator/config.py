"""Every setting and period of the operator, in one place.

Defaults follow the seed (package lengths 24 h / 7x24 h / 30x24 h, a reminder 7 days
before expiry, storage settled every hour); each can be overridden by an environment
variable (``GPUCLOUD_OPERATOR_<NAME>``) or a command-line flag so that end-to-end tests
run a month of rules in seconds. Billing instants always come from the injected clock
(``GPUCLOUD_CLOCK``); the ``*_interval_s`` settings are real seconds between checks.

`from_env` picks the variables out of the environment; pydantic converts and checks each
value by the rule written on its field's type; an error names the field and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpucloud.billing import PackagePeriod

ENV_PREFIX = "GPUCLOUD_OPERATOR_"
# Shared with the API process as GPUCLOUD_<NAME>; the operator's own name wins.
SHARED = ("ledger_url", "clock")

NonEmpty = Annotated[str, Field(min_length=1)]
Interval = Annotated[float, Field(gt=0)]  # real seconds between checks: 0 would spin
NonNegativeFloat = Annotated[float, Field(ge=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]  # a package or idle period of 0 s is no period
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = off


class OperatorConfig(BaseModel):
    """Constructing one takes only the values given (tests rely on plain defaults);
    `from_env` reads the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ledger_url: NonEmpty = "sqlite:///var/lib/gpucloud/ledger.db"
    clock: NonEmpty = "system"  # "system" or "file:PATH"
    pricebook: NonEmpty = "default"  # name of the cluster-scoped PriceBook
    # Real seconds between the periodic checks of each instance / account / recharge.
    tick_interval_s: Interval = 30.0
    # The longest an instance waits for a pass, in clock and in real seconds, when no
    # time rule of its own is due sooner (gpucloud_operator.instances.sweeper): passes
    # run when something is due; this is the safety net for what no event announces.
    sweep_max_interval_s: Interval = 300.0
    account_interval_s: Interval = 15.0
    recharge_interval_s: Interval = 5.0
    # Real seconds between full lists that check the watch-fed tables of instances and
    # accounts (gpucloud_operator.cluster_view): a deletion the watch missed lasts that long.
    view_resync_s: Interval = 60.0
    # Real seconds between refreshes of a running instance's status.accruedCost.
    cost_refresh_s: NonNegativeFloat = 60.0
    # Clock seconds: how long to wait for agents' usage of a stopped run before billing the
    # run from the control plane's timestamps instead.
    metering_grace_s: NonNegativeInt = 300
    # Clock seconds between a spot instance's preemption notice and its stop.
    preemption_grace_s: NonNegativeInt = 120
    # Clock seconds before expiry when the package reminder is due (the seed: 7 days).
    reminder_lead_s: NonNegativeInt = 7 * 24 * 3600
    # Package lengths in clock seconds (the seed: day 24 h, week 7x24 h, month 30x24 h).
    package_day_s: Positive = PackagePeriod.DAY.seconds
    package_week_s: Positive = PackagePeriod.WEEK.seconds
    package_month_s: Positive = PackagePeriod.MONTH.seconds
    # Instance storage is settled in windows of this many clock seconds (the seed: 1 h).
    storage_settlement_s: NonNegativeInt = 3600
    # How long an online payment order stays payable.
    order_ttl_s: NonNegativeInt = 15 * 60
    pay_base_url: NonEmpty = "https://sandbox.gpucloud.invalid/pay"
    finalizer: NonEmpty = "gpucloud.dev/release"
    # -- arrears, cloud disks and images (docs/arrears.md) --
    # Clock seconds of continuous arrears after which the account's data is deleted
    # (the seed: 7 days).
    arrears_retention_s: NonNegativeInt = 7 * 24 * 3600
    # Default webhook for notifications ("" = none); Account.spec.webhook.url wins.
    webhook_url: str = ""
    # Where instance volumes, cloud disks and images live on a node (the agent's disk
    # root): <data_root>/{instances,disks,images}/<namespace>/<name>.
    data_root: NonEmpty = "/var/lib/gpucloud"
    # Real seconds between checks of each CloudDisk / Image.
    storage_interval_s: Interval = 15.0
    # Where cloud disks' PersistentVolumes point: "" = hostPath <data_root>/disks/... (the
    # data root shared on one host, the test bed); else the NFS server exporting the data
    # root at disk_nfs_path ("" = the same path as data_root).
    disk_nfs_server: str = ""
    disk_nfs_path: str = ""
    # The agent that meters cloud disks ("" = whichever node reports first, the test
    # bed's single host): shared storage is seen by every node, so the chart runs one
    # shared-storage meter under this reporter name, binds every disk meter to it and
    # has it remove deleted disks' folders (docs/operator.md, "Cloud disks").
    disk_meter_node: str = ""
    # Comma list of namespaces whose instances and recharges this operator serves
    # ("" = all). Cluster-scoped kinds are always served cluster-wide.
    namespaces: str = ""
    # -- ModelDeployments (gpucloud_operator.models) -------------------------------------
    # Real seconds between scaling passes of each model (the autoscaler's window: ~10 min).
    model_interval_s: Interval = 600.0
    # Where the gateway's per-model stats come from: "http(s)://.../v1/stats" (production),
    # "file:PATH" (a JSON file of the same shape, tests) or "none" (no traffic seen).
    model_stats_url: NonEmpty = "none"
    # Clock seconds a model with minReplicas 0 stays idle before going cold, when its
    # spec.scaling.coldAfterSeconds is not set.
    model_cold_after_s: Positive = 600
    # Port of the Prometheus /metrics endpoint (gpucloud_operator.metrics); 0 = off.
    metrics_port: Port = 0
    # -- HA (Kopf peering, --peering NAME) ------------------------------------------------
    # Only the live replica of the highest priority works; the others stand by. 0 = a
    # random priority at start-up, so the replicas of one Deployment differ (equal
    # priorities make Kopf pause them all).
    peering_priority: NonNegativeInt = 0
    # Real seconds a replica counts as alive after its last heartbeat: a standby takes
    # over at most this long after the active replica dies (Kopf's default is 60; below
    # 7 its heartbeat comes every second).
    peering_lifetime_s: NonNegativeInt = 6

    def serves(self, namespace: str | None) -> bool:
        wanted = [n.strip() for n in self.namespaces.split(",") if n.strip()]
        return not wanted or namespace in wanted

    def package_length(self, period: PackagePeriod | str) -> timedelta:
        seconds = {
            PackagePeriod.DAY: self.package_day_s,
            PackagePeriod.WEEK: self.package_week_s,
            PackagePeriod.MONTH: self.package_month_s,
        }[PackagePeriod(period)]
        return timedelta(seconds=seconds)

    @property
    def arrears_retention(self) -> timedelta:
        return timedelta(seconds=self.arrears_retention_s)

    @property
    def reminder_lead(self) -> timedelta:
        return timedelta(seconds=self.reminder_lead_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Defaults overridden by GPUCLOUD_OPERATOR_<FIELD> (and GPUCLOUD_LEDGER_URL,
        GPUCLOUD_CLOCK, shared with the API process); `env` replaces os.environ."""
        env = os.environ if env is None else env
        # by field name, so that an error names the field whichever variable set it
        values = {name: env["GPUCLOUD_" + name.upper()] for name in SHARED
                  if "GPUCLOUD_" + name.upper() in env}  # fmt: skip
        for name in cls.model_fields:
            if ENV_PREFIX + name.upper() in env:
                values[name] = env[ENV_PREFIX + name.upper()]
        return cls._validated(values)

    def with_overrides(self, overrides: Mapping[str, object]) -> OperatorConfig:
        """A copy with some fields replaced (by field name, as the flags give them);
        strings are converted to the field's type and checked."""
        return self._validated({**self.model_dump(), **overrides})

    @classmethod
    def _validated(cls, values: Mapping[str, Any]) -> OperatorConfig:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> ValueError:
    """The first error as `field: rule (got value)`, e.g. `tick_interval_s: Input should be
    greater than 0 (got '0')`."""
    err = exc.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    if err["type"] == "extra_forbidden":
        return ValueError(f"unknown operator setting {name!r}")
    return ValueError(f"{name}: {err['msg']} (got {err['input']!r})")
