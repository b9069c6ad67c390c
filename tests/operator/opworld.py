from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.placement import NodeGPUs
from opfake import FakeKube

from gpucloud.clock import ManualClock
from gpucloud.ledger import EntryKind, Ledger, open_ledger

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

    def instance(
        self, name: str, product: str, count: int = 1, quota: int = 50, **billing: object
    ) -> dict:
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
                    "storage": {"quotaGi": quota},
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

    def price(self, section: str, field: str, value: str) -> None:
        """Change one price of the default PriceBook (a new resourceVersion, as the API
        server would give it, so the reconciler parses it again)."""
        pb = self.kube.cluster[("pricebooks", "default")]
        pb["spec"][section][field] = value
        meta = pb["metadata"]
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)

    def storage_charges(self, account: str = "acme") -> int:
        """Minor units posted for instance storage (keys storage:<uid>:<window>)."""
        return -sum(
            e.amount_minor
            for e in self.ledger.entries(account, limit=10_000)
            if e.key.startswith("storage:")
        )

    def restart(self) -> None:
        """A new operator process: nothing kept in memory."""
        self.rec = InstanceReconciler(self.kube, self.ledger, self.clock, self.cfg)


def make_world(tmp: Path) -> World:
    """Two GPU nodes (4 x L40S, 8 x A100), the example PriceBook, account acme with
    namespace team-a, a real SQLite ledger under ``tmp`` and a manual clock at T0."""
    kube = FakeKube(
        [
            NodeGPUs("gpu-l40s-0", "NVIDIA-L40S", 4),
            NodeGPUs("gpu-a100-0", "NVIDIA-A100-SXM4-80GB", 8),
        ]
    )
    kube.add_cluster("pricebooks", yaml.safe_load((ROOT / "examples/pricebook.yaml").read_text()))
    kube.add_cluster(
        "accounts",
        {"metadata": {"name": "acme"}, "spec": {"namespaces": [NS], "instanceLimit": 3}},
    )
    clock = ManualClock(T0)
    ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}", clock=clock)
    ledger.ensure_account("acme", "CNY")
    cfg = OperatorConfig(metering_grace_s=60, preemption_grace_s=120)
    return World(kube, ledger, clock, cfg, InstanceReconciler(kube, ledger, clock, cfg))
