from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import InstanceReconciler
from opfake import FakeKube

from gpucloud.clock import ManualClock
from gpucloud.ledger import EntryKind, Ledger

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NS = "team-a"


@dataclass
class World:
    kube: FakeKube
    ledger: Ledger
    clock: ManualClock
    cfg: OperatorConfig
    rec: InstanceReconciler

    def fund(self, minor: int, key: str = "fund-1") -> None:
        self.ledger.post_entry("acme", EntryKind.RECHARGE, minor, key, at=self.clock.now())

    def instance(self, name: str, product: str, count: int = 1, **billing: object) -> dict:
        billing.setdefault("mode", "PayAsYouGo")
        return self.kube.add_namespaced(
            "gpuinstances",
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "GPUInstance",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "gpu": {"product": product, "count": count},
                    "billing": billing,
                    "storage": {"quotaGi": 50},
                    "state": "Running",
                },
            },
        )

    def tick(self, *names: str) -> None:
        """One pass over the named instances (all when none), then a scheduling round."""
        for _ in range(2):
            for (plural, ns, name), _obj in list(self.kube.namespaced.items()):
                if plural == "gpuinstances" and (not names or name in names):
                    self.rec.reconcile_named(ns, name)
            self.kube.schedule()

    def status(self, name: str) -> dict:
        return self.kube.instance(NS, name).get("status", {})

    def restart(self) -> None:
        """A new operator process: nothing kept in memory."""
        self.rec = InstanceReconciler(self.kube, self.ledger, self.clock, self.cfg)
