"""One currency per bill: a price book in another currency than the Account's would post
its figures as the account's money (19.80 CNY an hour as 19.80 USD). Starts, models and
storage items are refused naming both `spec.currency` fields; nothing is charged, and
the same objects run once the price book is in the account's currency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpucloud_operator.storage_items import StorageItems
from opworld import NS, World
from test_models import Models


def set_pricebook_currency(kube: Any, currency: str) -> None:
    pb = kube.cluster[("pricebooks", "default")]
    pb["spec"]["currency"] = currency
    meta = pb["metadata"]
    meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)


def reason(obj: dict) -> tuple[str, str]:
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    return ready["reason"], ready["message"]


def test_a_start_priced_in_another_currency_is_refused_and_charges_nothing(world: World) -> None:
    w = world
    w.fund(100_00)
    set_pricebook_currency(w.kube, "USD")
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    st = w.status("job")
    assert st["phase"] == "Refused"
    why, message = reason(w.kube.instance(NS, "job"))
    assert why == "CurrencyMismatch"
    assert "'acme'" in message and "CNY" in message and "USD" in message
    assert "spec.currency" in message
    assert not w.kube.pods  # no pod was made
    assert w.ledger.balance("acme") == 100_00

    set_pricebook_currency(w.kube, "CNY")  # an admin fixes the price book
    w.tick()
    assert w.status("job")["phase"] == "Running"


def test_a_model_priced_in_another_currency_stays_cold(tmp_path: Path) -> None:
    m = Models(tmp_path)
    set_pricebook_currency(m.kube, "EUR")
    m.traffic(5, queued=1)
    assert m.tick(ensure=True) is None
    assert m.pods() == [] and m.status()["state"] == "Cold"
    assert "CurrencyMismatch" in m.kube.reasons("llm")
    why, message = reason(m.kube.namespaced[("modeldeployments", NS, "llm")])
    assert why == "CurrencyMismatch" and "EUR" in message and "CNY" in message
    set_pricebook_currency(m.kube, "CNY")
    m.tick()
    assert len(m.pods()) == 1
    m.ledger.close()


def test_a_cloud_disk_priced_in_another_currency_fails_without_a_meter(
    world: World, tmp_path: Path
) -> None:
    w = world
    s = StorageItems(w.kube, w.ledger, w.clock, w.cfg.with_overrides({"data_root": str(tmp_path)}))
    set_pricebook_currency(w.kube, "JPY")
    disk = w.kube.add_namespaced(
        "clouddisks",
        {"kind": "CloudDisk", "metadata": {"name": "scratch", "namespace": NS},
         "spec": {"capacityGi": 100}},
    )  # fmt: skip
    s.reconcile("clouddisks", disk)
    st = w.kube.namespaced[("clouddisks", NS, "scratch")]["status"]
    assert st["phase"] == "Failed" and "meterId" not in st
    why, message = reason(w.kube.namespaced[("clouddisks", NS, "scratch")])
    assert why == "CurrencyMismatch" and "JPY" in message
    assert w.ledger.get_account("acme").currency == "CNY"  # not made in the book's
    set_pricebook_currency(w.kube, "CNY")
    s.reconcile("clouddisks", w.kube.namespaced[("clouddisks", NS, "scratch")])
    assert w.kube.namespaced[("clouddisks", NS, "scratch")]["status"]["phase"] == "Ready"
