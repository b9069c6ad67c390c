"""Prometheus metrics of the operator: account balances, arrears, cost per hour, budget
ratios, budget refusals, runway notices, instances by phase, and spot preemption
counters, on the operator's own registry (``--metrics-port``).

Money is exported in the currency's major units as a float. That is for display only
(dashboards, alerts): the ledger keeps exact integer minor units, and nothing reads money
back from these gauges.

Account figures are recorded by the account reconciler on each pass; an account not
refreshed for ``stale_after_s`` (deleted, or no longer served) drops out of the
exposition instead of showing its last figures forever. Instance phases are counted at
scrape time from the (briefly cached) instance list. The spot counters count what this
process did (a replica that takes over starts from zero: use ``rate()``/``increase()``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpucloud.billing import from_minor

log = logging.getLogger("gpucloud.operator.metrics")
Obj = dict[str, Any]
# Phases always exported (0 when none), so a dashboard's series do not come and go.
PHASES = (
    "Pending", "Starting", "Running", "Stopping", "Stopped", "Preempted", "Expired", "Refused",
    "Released", "Queued",
)  # fmt: skip


@dataclass(frozen=True)
class AccountSample:
    currency: str
    balance: float  # major units (display only)
    available: float
    cost_per_hour: float
    in_arrears: bool
    data_deletion_at: datetime | None
    seen: float  # time.monotonic() of the pass that recorded it
    budget_ratios: tuple[tuple[str, float], ...] = ()  # (namespace or "", spent / monthly)


class AccountMetrics(Collector):
    """The latest figures of each account, exported as gauges."""

    def __init__(self, stale_after_s: float = 120.0) -> None:
        self.stale_after_s = stale_after_s
        self._samples: dict[str, AccountSample] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        account: str,
        currency: str,
        *,
        balance_minor: int,
        available_minor: int,
        cost_per_hour: Decimal,
        in_arrears: bool,
        data_deletion_at: datetime | None,
        budget_ratios: dict[str, float] | None = None,
    ) -> None:
        """``budget_ratios``: spent / monthly of each budget, by namespace ("" for the
        account's own)."""
        sample = AccountSample(
            currency=currency,
            balance=float(from_minor(balance_minor, currency)),
            available=float(from_minor(available_minor, currency)),
            cost_per_hour=float(cost_per_hour),
            in_arrears=in_arrears,
            data_deletion_at=data_deletion_at if in_arrears else None,
            seen=time.monotonic(),
            budget_ratios=tuple(sorted((budget_ratios or {}).items())),
        )
        with self._lock:
            self._samples[account] = sample

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        with self._lock:
            self._samples = {
                k: v for k, v in self._samples.items() if now - v.seen <= self.stale_after_s
            }
            samples = sorted(self._samples.items())
        labels = ["account", "currency"]
        balance = GaugeMetricFamily(
            "gpucloud_account_balance",
            "Ledger balance of the account, in the currency's major units (display only)",
            labels=labels,
        )
        available = GaugeMetricFamily(
            "gpucloud_account_available_balance",
            "Balance minus what running meters accrued, in major units (display only)",
            labels=labels,
        )
        cost = GaugeMetricFamily(
            "gpucloud_account_cost_per_hour",
            "What the account's running instances and stored data cost per hour now",
            labels=labels,
        )
        arrears = GaugeMetricFamily(
            "gpucloud_account_in_arrears", "1 while the account is in arrears", labels=["account"]
        )
        deletion = GaugeMetricFamily(
            "gpucloud_account_data_deletion_timestamp_seconds",
            "When the data of an account in arrears is deleted (Unix time)",
            labels=["account"],
        )
        budget = GaugeMetricFamily(
            "gpucloud_account_budget_spent_ratio",
            "This month's spending over the monthly budget (1 = all of it), per budget: "
            'namespace="" is the account\'s own',
            labels=["account", "namespace"],
        )
        for name, s in samples:
            for namespace, ratio in s.budget_ratios:
                budget.add_metric([name, namespace], ratio)
            balance.add_metric([name, s.currency], s.balance)
            available.add_metric([name, s.currency], s.available)
            cost.add_metric([name, s.currency], s.cost_per_hour)
            arrears.add_metric([name], 1.0 if s.in_arrears else 0.0)
            if s.data_deletion_at is not None:
                deletion.add_metric([name], s.data_deletion_at.timestamp())
        yield from (balance, available, cost, arrears, deletion, budget)


class InstancePhases(Collector):
    """GPUInstances by status.phase, counted when scraped."""

    def __init__(
        self, instances: Callable[[], Iterable[Obj]], serves: Callable[[str | None], bool]
    ) -> None:
        self.instances, self.serves = instances, serves

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            items = [i for i in self.instances() if self.serves(i["metadata"].get("namespace"))]
        except Exception as exc:  # an unreachable API server must not fail the whole scrape
            log.warning("instances by phase: %s", exc)
            return
        counts = Counter((i.get("status") or {}).get("phase") or "Pending" for i in items)
        family = GaugeMetricFamily(
            "gpucloud_operator_instances", "GPUInstances served, by phase", labels=["phase"]
        )
        for phase in sorted(set(PHASES) | set(counts)):
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class SpotMetrics:
    """What spot preemption did, by GPU product (docs/spot.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        labels = ["product"]
        self.notices = prometheus_client.Counter(
            "gpucloud_spot_preemption_notices",
            "Preemption notices given to spot instances",
            labels,
            registry=registry,
        )
        self.preemptions = prometheus_client.Counter(
            "gpucloud_spot_preemptions",
            "Spot instances stopped when their notice ran out (queued ones included)",
            labels,
            registry=registry,
        )
        self.resumes = prometheus_client.Counter(
            "gpucloud_spot_resumes",
            "Preempted spot instances (spec.spot.resume) started again on their node",
            labels,
            registry=registry,
        )


class NoticeCounters:
    """Counters of budget refusals, runway and idle notices (on ``registry``; a fresh one by
    default, so tests and processes never share counts)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.budget_refusals = prometheus_client.Counter(
            "gpucloud_budget_refusals",
            "Instance starts refused because a budget would be exceeded",
            ["account"],
            registry=registry,
        )
        self.runway_notices = prometheus_client.Counter(
            "gpucloud_runway_notices",
            "Runway notices sent (the balance lasts less than the tier's hours)",
            ["tier"],
            registry=registry,
        )
        self.budget_notices = prometheus_client.Counter(
            "gpucloud_budget_notices",
            "Budget notices sent, by tier (100: the budget is exceeded)",
            ["percent"],
            registry=registry,
        )
        self.idle_notices = prometheus_client.Counter(
            "gpucloud_idle_notices",
            "Idle-GPU notices sent (an instance idle for its policy's notifyAfterMinutes)",
            ["product"],
            registry=registry,
        )
        self.idle_stops = prometheus_client.Counter(
            "gpucloud_idle_stops",
            "Instances stopped by their Account's idle policy (stopAfterMinutes)",
            ["product"],
            registry=registry,
        )


class OperatorMetrics:
    """The operator's registry and its collectors."""

    def __init__(self, stale_after_s: float = 120.0) -> None:
        self.registry = CollectorRegistry()
        self.accounts = AccountMetrics(stale_after_s)
        self.registry.register(self.accounts)
        self.spot = SpotMetrics(self.registry)
        self.notices = NoticeCounters(self.registry)

    def count_instances(
        self, instances: Callable[[], Iterable[Obj]], serves: Callable[[str | None], bool]
    ) -> None:
        self.registry.register(InstancePhases(instances, serves))

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """/metrics on a daemon thread (prometheus_client's server)."""
        start_http_server(port, addr=address, registry=self.registry)
