"""Every setting and period of the operator, in one place.

Defaults follow the seed (package lengths 24 h / 7x24 h / 30x24 h, a reminder 7 days
before expiry, storage settled every hour); each can be overridden by an environment
variable (``GPUCLOUD_OPERATOR_<NAME>``) or a command-line flag so that end-to-end tests
run a month of rules in seconds. Billing instants always come from the injected clock
(``GPUCLOUD_CLOCK``); the ``*_interval_s`` settings are real seconds between checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta

from gpucloud.billing import PackagePeriod

ENV_PREFIX = "GPUCLOUD_OPERATOR_"


@dataclass(frozen=True)
class OperatorConfig:
    ledger_url: str = "sqlite:///var/lib/gpucloud/ledger.db"
    clock: str = "system"  # as GPUCLOUD_CLOCK: "system" or "file:PATH"
    pricebook: str = "default"  # name of the cluster-scoped PriceBook
    # Real seconds between the periodic checks of each instance / account / recharge.
    tick_interval_s: float = 30.0
    account_interval_s: float = 15.0
    recharge_interval_s: float = 5.0
    # Real seconds between refreshes of a running instance's status.accruedCost.
    cost_refresh_s: float = 60.0
    # Clock seconds: how long to wait for agents' usage of a stopped run before billing the
    # run from the control plane's timestamps instead.
    metering_grace_s: int = 300
    # Clock seconds between a spot instance's preemption notice and its stop.
    preemption_grace_s: int = 120
    # Clock seconds before expiry when the package reminder is due (the seed: 7 days).
    reminder_lead_s: int = 7 * 24 * 3600
    # Package lengths in clock seconds (the seed: day 24 h, week 7x24 h, month 30x24 h).
    package_day_s: int = PackagePeriod.DAY.seconds
    package_week_s: int = PackagePeriod.WEEK.seconds
    package_month_s: int = PackagePeriod.MONTH.seconds
    # Instance storage is settled in windows of this many clock seconds (the seed: 1 h).
    storage_settlement_s: int = 3600
    # How long an online payment order stays payable.
    order_ttl_s: int = 15 * 60
    pay_base_url: str = "https://sandbox.gpucloud.invalid/pay"
    finalizer: str = "gpucloud.dev/release"
    # -- arrears, cloud disks and images (docs/arrears.md) --
    # Clock seconds of continuous arrears after which the account's data is deleted
    # (the seed: 7 days).
    arrears_retention_s: int = 7 * 24 * 3600
    # Default webhook for notifications ("" = none); Account.spec.webhook.url wins.
    webhook_url: str = ""
    # Where instance volumes, cloud disks and images live on a node (the agent's disk
    # root): <data_root>/{instances,disks,images}/<namespace>/<name>.
    data_root: str = "/var/lib/gpucloud"
    # Real seconds between checks of each CloudDisk / Image.
    storage_interval_s: float = 15.0
    # Where cloud disks' PersistentVolumes point: "" = hostPath <data_root>/disks/... (the
    # data root shared on one host, the test bed); else the NFS server exporting the data
    # root at disk_nfs_path ("" = the same path as data_root).
    disk_nfs_server: str = ""
    disk_nfs_path: str = ""
    # Comma list of namespaces whose instances and recharges this operator serves
    # ("" = all). Cluster-scoped kinds are always served cluster-wide.
    namespaces: str = ""
    # -- ModelDeployments (gpucloud_operator.models) -------------------------------------
    # Real seconds between scaling passes of each model (the autoscaler's window: ~10 min).
    model_interval_s: float = 600.0
    # Where the gateway's per-model stats come from: "http(s)://.../v1/stats" (production),
    # "file:PATH" (a JSON file of the same shape, tests) or "none" (no traffic seen).
    model_stats_url: str = "none"
    # Clock seconds a model with minReplicas 0 stays idle before going cold, when its
    # spec.scaling.coldAfterSeconds is not set.
    model_cold_after_s: int = 600
    # The operator's own SQLite file of replica online intervals (crash-safe billing).
    model_billing_db: str = "/var/lib/gpucloud/model-billing.db"
    # Port of the Prometheus /metrics endpoint (gpucloud_operator.metrics); 0 = off.
    metrics_port: int = 0
    # -- HA (Kopf peering, --peering NAME) ------------------------------------------------
    # Only the live replica of the highest priority works; the others stand by. 0 = a
    # random priority at start-up, so the replicas of one Deployment differ (equal
    # priorities make Kopf pause them all).
    peering_priority: int = 0
    # Real seconds a replica counts as alive after its last heartbeat: a standby takes
    # over at most this long after the active replica dies (Kopf's default is 60; below
    # 7 its heartbeat comes every second).
    peering_lifetime_s: int = 6

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
        GPUCLOUD_CLOCK, shared with the API process)."""
        env = os.environ if env is None else env
        overrides: dict[str, str] = {}
        if "GPUCLOUD_LEDGER_URL" in env:
            overrides["ledger_url"] = env["GPUCLOUD_LEDGER_URL"]
        if "GPUCLOUD_CLOCK" in env:
            overrides["clock"] = env["GPUCLOUD_CLOCK"]
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                overrides[f.name] = env[key]
        return cls().with_overrides(overrides)

    def with_overrides(self, overrides: Mapping[str, object]) -> OperatorConfig:
        """A copy with some fields replaced; strings are converted to the field's type and
        checked, and an error names the field and the rule."""
        kinds = {f.name: f.type for f in fields(self)}
        values: dict[str, object] = {}
        for name, raw in overrides.items():
            if name not in kinds:
                raise ValueError(f"unknown operator setting {name!r}")
            values[name] = _convert(name, str(kinds[name]), raw)
        return replace(self, **values)


def _convert(name: str, kind: str, raw: object) -> object:
    if kind == "str":
        text = str(raw)
        if not text and name not in (
            "namespaces",
            "webhook_url",
            "disk_nfs_server",
            "disk_nfs_path",
        ):
            raise ValueError(f"{name}: must not be empty")
        return text
    number_type = int if kind == "int" else float
    try:
        value = number_type(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        what = "an integer" if kind == "int" else "a number"
        raise ValueError(f"{name}: {raw!r} is not {what}") from None
    if value < 0 or (name.endswith("_interval_s") and value == 0):
        raise ValueError(f"{name}: must be {'> 0' if name.endswith('_interval_s') else '>= 0'}")
    if name == "metrics_port" and value > 65535:
        raise ValueError(f"{name}: must be a TCP port (0-65535; 0 = off)")
    if (name.startswith("package_") or name == "model_cold_after_s") and value == 0:
        raise ValueError(f"{name}: must be > 0")
    return value
