"""The one-hour rule as the reconciler applies it (the seed: pay-as-you-go starts only
while "the balance is greater than the usage cost of one hour", running instances'
costs deducted), with ragged prices: the balance must be strictly greater than the
hour; stopped runs still waiting for settlement and admitted-but-uncharged package terms
and renewals are deducted from it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from gpucloud_operator.placement import NodeGPUs
from opworld import NS, World

H100 = "NVIDIA-H100-80GB-HBM3"  # 19.80/h in examples/pricebook.yaml
L40S = "NVIDIA-L40S"  # 5.20/h, day package 112.00


@pytest.fixture(autouse=True)
def h100_node(world: World) -> None:
    world.kube.nodes.append(NodeGPUs("gpu-h100-0", H100, 8))


def ready(w: World, name: str) -> dict:
    return next(c for c in w.status(name)["conditions"] if c["type"] == "Ready")


def test_a_balance_equal_to_one_hour_is_refused_with_the_figures(world: World) -> None:
    w = world
    w.fund(19_82)  # 1 x H100 19.80 + 50 GiB x 0.0004 = 19.82 for one hour
    w.instance("nb", H100)
    w.tick()
    st = w.status("nb")
    assert st["phase"] == "Refused" and ready(w, "nb")["reason"] == "InsufficientBalance"
    assert "greater than one hour's cost, 19.82 CNY" in st["message"]
    assert "available 19.82 CNY (short by 0.01 CNY)" in st["message"]
    assert not w.kube.pods
    w.fund(1, "fund-2")  # 19.83 is greater: a refused instance is checked again
    w.tick()
    assert w.status("nb")["phase"] == "Running"


def test_a_stopped_run_waiting_for_settlement_is_deducted(world: World) -> None:
    """Balance 30.00; A runs 40 min and stops; B asks at once. A owes 13.20 until its
    settlement after the metering grace period: B sees 16.80, not 30.00."""
    w = world
    w.fund(30_00)
    w.instance("a", H100)
    w.tick("a")
    w.clock.advance(timedelta(minutes=40))
    w.kube.update_spec("gpuinstances", NS, "a", {"state": "Stopped"})
    w.tick("a")
    assert w.status("a")["phase"] == "Stopped" and w.status("a")["unsettledMeters"]
    assert w.ledger.balance("acme") == 30_00  # nothing posted yet (no agent usage)
    w.instance("b", H100)
    w.tick("b")
    st = w.status("b")
    assert st["phase"] == "Refused"
    assert "available 16.80 CNY" in st["message"] and "19.82 CNY" in st["message"]
    # after the settlement the figure is the same, now posted
    w.clock.advance(61)
    w.tick("a")
    assert w.ledger.balance("acme") == 30_00 - 13_20
    w.tick("b")
    assert "available 16.80 CNY" in w.status("b")["message"]


def _fill_the_l40s_node(w: World) -> None:
    w.instance("big", L40S, 4)  # the only L40S node has 4 GPUs
    w.tick("big")
    assert w.status("big")["phase"] == "Running"


def test_an_admitted_package_term_is_reserved_until_it_is_charged(world: World) -> None:
    """A package term is charged when the pod runs. A package start admitted while its
    node is full (Pending) reserves its term: another start cannot spend that money."""
    w = world
    w.fund(150_00)
    _fill_the_l40s_node(w)
    w.instance("p1", L40S, mode="Package", period="Day")
    w.tick("p1")
    assert w.status("p1")["phase"] == "Pending"
    assert not w.ledger.entries("acme")[1:]  # the term is not charged yet
    w.instance("p2", L40S, mode="Package", period="Day")
    w.tick("p2")
    st = w.status("p2")
    assert st["phase"] == "Refused" and "day package" in st["message"]
    assert "available 38.00 CNY" in st["message"]  # 150.00 - 112.00 reserved
    w.instance("h", H100, 2)  # 39.62 for an hour: the one-hour rule deducts it too
    w.tick("h")
    assert w.status("h")["phase"] == "Refused"
    assert "available 38.00 CNY" in w.status("h")["message"]
    # a new operator process (nothing in memory) sees the reservation in the status
    w.restart()
    w.tick("h")
    assert "available 38.00 CNY" in w.status("h")["message"]
    # p1 runs: the term is charged once, and no longer reserved
    w.kube.update_spec("gpuinstances", NS, "big", {"state": "Stopped"})
    w.tick("big")
    w.tick("p1")
    assert w.status("p1")["phase"] == "Running"
    assert w.ledger.balance("acme") == 150_00 - 112_00
    w.tick("h")
    assert "available 38.00 CNY" in w.status("h")["message"]  # not 112.00 twice


def test_a_renewal_due_is_reserved_until_the_next_pass_charges_it(world: World) -> None:
    w = world
    w.fund(229_00)  # two day terms of L40S (224.00) and 5.00
    w.instance("pkg", L40S, mode="Package", period="Day", autoRenew=True)
    w.tick("pkg")
    assert w.ledger.balance("acme") == 117_00
    w.clock.advance(timedelta(hours=24))  # expired; the renewal is the next pass's job
    w.instance("c", L40S)
    w.tick("c")
    st = w.status("c")
    assert st["phase"] == "Refused" and "available 5.00 CNY" in st["message"]
    w.tick("pkg")
    assert len(w.status("pkg")["packageTerms"]) == 2 and w.ledger.balance("acme") == 5_00
    w.fund(1_00, "fund-2")  # 6.00 is greater than 5.22: the charged renewal is not reserved
    w.tick("c")
    assert w.status("c")["phase"] == "Running"
