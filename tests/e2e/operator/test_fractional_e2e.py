"""MIG slices and time-sliced shares on the kwok test bed (issue 19): a node split into
7 x 1g.10gb and a GPU time-sliced 4 ways, each pod given its device by a fake
pod-resources server, metered by a real agent through the metering API, and each
instance billed exactly its slice or share, to the fen."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from opharness import Harness, fake_node, node_agent

from gpucloud.billing import to_minor
from gpucloud.testing.testbed import NodeSpec, Testbed

pytestmark = pytest.mark.e2e

H100 = "NVIDIA-H100-80GB-HBM3"
MIG, SHARED = f"{H100}-MIG-1g.10gb", f"{H100}-SHARED"
PRICE = {MIG: Decimal("2.83"), SHARED: Decimal("4.95")}  # examples/pricebook.yaml


@pytest.fixture
def h(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(testbed, namespace, tmp_path)
    harness.setup(instance_limit=11)
    yield harness
    harness.close()


def _meter_charge(h: Harness, meter_id: str) -> int:
    return -sum(
        e.amount_minor
        for e in h.ledger.entries(h.account, limit=10_000)
        if e.key.startswith((f"meter:{meter_id}:", f"meter-fallback:{meter_id}"))
    )


def test_seven_mig_slices_and_four_shares_each_billed_its_own_price(
    h: Harness, namespace: str
) -> None:
    suffix = namespace[-5:]
    mig_spec = NodeSpec(f"gpu-h100-mig-{suffix}", H100, 0, mig=("1g.10gb",) * 7)
    ts_spec = NodeSpec(f"gpu-h100-ts-{suffix}", H100, 1, replicas=4)
    h.fund(1000_00)
    with (
        fake_node(h.tb, mig_spec) as mig_node,
        fake_node(h.tb, ts_spec) as ts_node,
        node_agent(h, mig_node, gpus=True),
        node_agent(h, ts_node, gpus=True),
    ):
        h.start()
        names = {f"slice-{i}": MIG for i in range(7)} | {f"share-{n}": SHARED for n in range(4)}
        for name, product in names.items():
            h.instance(name, product)
        for name, product in names.items():
            st = h.wait_phase(name, "Running", timeout=120)
            pod = h.pod(name)
            assert pod is not None
            want = "nvidia.com/mig-1g.10gb" if product == MIG else "nvidia.com/gpu.shared"
            assert pod["spec"]["containers"][0]["resources"]["limits"] == {want: "1"}
            assert st["node"] == (mig_node if product == MIG else ts_node)
        meters = {name: h.status(name)["meterId"] for name in names}

        # the agents sample each second of the file clock as it moves
        for _ in range(30):
            h.advance(1)
            time.sleep(0.25)

        def bound() -> bool:
            return all(h.ledger.get_meter(m).gpu_uuids for m in meters.values())

        h.wait(bound, "every meter bound to its device by the agents' usage", timeout=60)
        devices = {name: h.ledger.get_meter(m).gpu_uuids for name, m in meters.items()}
        slices = [devices[f"slice-{i}"] for i in range(7)]
        shares = [devices[f"share-{n}"] for n in range(4)]
        assert all(len(d) == 1 and d[0].startswith("MIG-") for d in slices)
        assert len({d[0] for d in slices}) == 7  # seven tenants, seven different slices
        assert {d[0].rsplit("::", 1)[1] for d in shares} == {"0", "1", "2", "3"}
        assert len({d[0].split("::")[0] for d in shares}) == 1  # one GPU, four replicas

        h.advance(970)  # bridged by each agent: the same pod held its device throughout
        for name in names:
            h.patch_spec(name, {"state": "Stopped"})
        for name in names:
            h.wait_phase(name, "Stopped", timeout=120)
        h.advance(61)  # past the metering grace
        h.wait(lambda: all(h.ledger.get_meter(m).settled_at for m in meters.values()),
               "every meter settled", timeout=120)  # fmt: skip

    for name, product in names.items():
        m = h.ledger.get_meter(meters[name])
        assert m.closed_at is not None
        seconds = int((m.closed_at - m.opened_at).total_seconds())
        assert seconds == 1000, name  # 30 + 970 s of the file clock
        assert m.unit_price == PRICE[product]
        assert m.quantity_rated > 0, name  # the agent's usage was admitted and rated
        assert _meter_charge(h, m.meter_id) == to_minor(PRICE[product] * seconds / 3600)
    # 1000 s at 2.83/h = 0.786 -> 0.79 per slice; at 4.95/h = 1.375 -> 1.38 (half even)
    assert _meter_charge(h, meters["slice-0"]) == 79
    assert _meter_charge(h, meters["share-0"]) == 138
    refused = [e for e in h.ledger.audit_events(h.account) if e.action == "usage.refused"]
    assert refused == []
