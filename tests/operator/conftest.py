from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.placement import NodeGPUs
from opfake import FakeKube
from opworld import NS, ROOT, T0, World

from gpucloud.clock import ManualClock
from gpucloud.ledger import open_ledger

__all__ = ["NS"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
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
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    ledger.ensure_account("acme", "CNY")
    cfg = OperatorConfig(metering_grace_s=60, preemption_grace_s=120)
    yield World(kube, ledger, clock, cfg, InstanceReconciler(kube, ledger, clock, cfg))
    ledger.close()
