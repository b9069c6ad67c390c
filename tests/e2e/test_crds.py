"""The CRD API against the real API server: examples apply, bad manifests are refused
with a message naming the field, and the schema's defaults and printer columns work."""

from __future__ import annotations

import copy
import subprocess
import uuid

import pytest
import yaml

from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import REPO, Testbed

pytestmark = pytest.mark.e2e
EXAMPLES = REPO / "examples"


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def localise(doc: dict, namespace: str) -> dict:
    """Put a namespaced example into the test's namespace; give cluster-scoped ones a
    unique name so tests never collide."""
    doc = copy.deepcopy(doc)
    if doc["kind"] in ("PriceBook", "Account", "RechargeReview"):
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{uuid.uuid4().hex[:6]}"
        if doc["kind"] == "Account":
            doc["spec"]["namespaces"] = [namespace]
        if doc["kind"] == "RechargeReview":
            doc["spec"]["rechargeRef"]["namespace"] = namespace
    else:
        doc["metadata"]["namespace"] = namespace
    return doc


def apply(tb: Testbed, doc: dict) -> subprocess.CompletedProcess[str]:
    return tb.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)


def delete(tb: Testbed, doc: dict) -> None:
    tb.kubectl("delete", "-f", "-", "--wait=false", input=yaml.safe_dump(doc), check=False)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_applies_and_reads_back(testbed: Testbed, namespace: str, example: str) -> None:
    doc = localise(load(example), namespace)
    proc = apply(testbed, doc)
    assert proc.returncode == 0, proc.stderr
    try:
        kind, name = doc["kind"].lower(), doc["metadata"]["name"]
        ns = ["-n", namespace] if "namespace" in doc["metadata"] else []
        got = get_json(testbed, f"{kind}.gpucloud.dev", name, *ns)
        # Everything the example set reads back unchanged (defaults may add fields).
        for key, value in doc["spec"].items():
            assert got["spec"][key] == value or isinstance(value, dict), key
        table = testbed.kubectl("get", f"{kind}.gpucloud.dev", name, *ns).stdout
        assert name in table
    finally:
        delete(testbed, doc)


def test_defaults_are_filled_in(testbed: Testbed, namespace: str) -> None:
    doc = localise(load("gpuinstance-spot.yaml"), namespace)
    del doc["spec"]["storage"]
    assert apply(testbed, doc).returncode == 0
    got = get_json(testbed, "gpuinstance", doc["metadata"]["name"], "-n", namespace)
    assert got["spec"]["state"] == "Running"
    assert got["spec"]["gpu"]["count"] == 2
    assert got["spec"]["billing"]["autoRenew"] is False
    assert got["spec"]["image"].startswith("nvcr.io/")


def test_short_names_and_category(testbed: Testbed, namespace: str) -> None:
    doc = localise(load("gpuinstance-payg.yaml"), namespace)
    assert apply(testbed, doc).returncode == 0
    out = testbed.kubectl("get", "gi", "-n", namespace).stdout
    assert doc["metadata"]["name"] in out
    header = out.splitlines()[0].split()
    for col in ("NAME", "STATE", "GPU", "NODE", "MODE", "COST", "AGE"):
        assert col in header
    out = testbed.kubectl("get", "gpucloud", "-n", namespace).stdout
    assert doc["metadata"]["name"] in out
    # Recharges answer to `rch`; `rc` stays ReplicationControllers'
    assert testbed.kubectl("get", "rch", "-n", namespace).returncode == 0
    out = testbed.kubectl("api-resources", "--api-group", "gpucloud.dev").stdout
    assert "rch" in out.split() and "rc" not in out.split()


def set_path(doc: dict, path: str, value: object) -> None:
    """Set (or, with value DELETE, remove) a dotted path such as spec.gpu.count."""
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value


DELETE = object()

# (example, changes, words the API server's message must contain)
INVALID: list[tuple[str, dict[str, object], list[str]]] = [
    (
        "gpuinstance-payg.yaml",
        {"spec.gpu.count": 0},
        ["spec.gpu.count", "greater than or equal to 1"],
    ),
    ("gpuinstance-payg.yaml", {"spec.gpu.count": 9}, ["spec.gpu.count", "less than or equal to 8"]),
    ("gpuinstance-payg.yaml", {"spec.gpu.product": "A100 80GB"}, ["spec.gpu.product"]),
    ("gpuinstance-payg.yaml", {"spec.gpu": DELETE}, ["spec.gpu", "Required"]),
    (
        "gpuinstance-payg.yaml",
        {"spec.billing.mode": "Hourly"},
        ["spec.billing.mode", "Unsupported value"],
    ),
    (
        "gpuinstance-payg.yaml",
        {"spec.billing.period": "Month"},
        ["spec.billing.period", "period is required when mode is Package"],
    ),
    (
        "gpuinstance-package.yaml",
        {"spec.billing.period": DELETE},
        ["spec.billing.period", "period is required"],
    ),
    (
        "gpuinstance-package.yaml",
        {"spec.billing.period": "Year"},
        ["spec.billing.period", "Unsupported value"],
    ),
    (
        "gpuinstance-payg.yaml",
        {"spec.billing.autoRenew": True},
        ["spec.billing.autoRenew", "only allowed when mode is Package"],
    ),
    ("gpuinstance-payg.yaml", {"spec.storage.quotaGi": 0}, ["spec.storage.quotaGi"]),
    ("gpuinstance-payg.yaml", {"spec.state": "Paused"}, ["spec.state", "Unsupported value"]),
    ("gpuinstance-payg.yaml", {"spec.gpu.count": "two"}, ["spec.gpu.count", "integer"]),
    (
        "modeldeployment-private.yaml",
        {"spec.minReplicas": 4, "spec.maxReplicas": 2},
        ["spec.minReplicas", "minReplicas must not exceed maxReplicas"],
    ),
    ("modeldeployment-private.yaml", {"spec.maxReplicas": 0}, ["spec.maxReplicas"]),
    (
        "modeldeployment-public.yaml",
        {"spec.pricing": DELETE},
        ["spec.pricing", "pricing is required for public models"],
    ),
    (
        "modeldeployment-private.yaml",
        {"spec.pricing": {"publisher": "Personal"}},
        ["spec.pricing", "forbidden for private"],
    ),
    (
        "modeldeployment-public.yaml",
        {"spec.pricing.task": DELETE},
        ["spec.pricing.task", "task is required for official models"],
    ),
    (
        "modeldeployment-public.yaml",
        {"spec.visibility": "Internal"},
        ["spec.visibility", "Unsupported value"],
    ),
    ("recharge-online.yaml", {"spec.amount": "-5"}, ["spec.amount"]),
    ("recharge-online.yaml", {"spec.amount": 500.0}, ["spec.amount", "string"]),
    ("recharge-online.yaml", {"spec.amount": "0"}, ["spec.amount", "must be greater than zero"]),
    ("recharge-online.yaml", {"spec.amount": "2000000.00"}, ["spec.amount", "at most 1000000"]),
    ("recharge-online.yaml", {"spec.method": "Cash"}, ["spec.method", "Unsupported value"]),
    (
        "recharge-online.yaml",
        {"spec.amount": "10.123"},
        ["spec.amount", "must not be finer than the currency's minor unit"],
    ),
    (
        "recharge-bank-transfer.yaml",
        {"spec.bankTransfer": DELETE},
        ["spec.bankTransfer", "required when method is BankTransfer"],
    ),
    (
        "recharge-bank-transfer.yaml",
        {"spec.bankTransfer.voucherRef": "md5:abc"},
        ["spec.bankTransfer.voucherRef"],
    ),
    (
        "recharge-bank-transfer.yaml",
        {"spec.bankTransfer.voucherRef": DELETE},
        ["spec.bankTransfer.voucherRef", "Required value"],
    ),
    (
        "rechargereview.yaml",
        {"spec.decision": "Reject", "spec.reason": DELETE},
        ["spec.reason", "reason is required when decision is Reject"],
    ),
    ("pricebook.yaml", {"spec.currency": "yuan"}, ["spec.currency"]),
    # a well-formed code the billing core cannot round: refused by the enum
    ("pricebook.yaml", {"spec.currency": "GBP"}, ["spec.currency", "supported values"]),
    ("account.yaml", {"spec.currency": "GBP"}, ["spec.currency", "supported values"]),
    (
        "pricebook.yaml",
        {"spec.storage.instancePerGBHour": 0.0004},
        ["spec.storage.instancePerGBHour"],
    ),
    ("pricebook.yaml", {"spec.gpus": []}, ["spec.gpus"]),
    ("account.yaml", {"spec.namespaces": ["Not_A_Namespace"]}, ["spec.namespaces[0]"]),
    ("account.yaml", {"spec.instanceLimit": -1}, ["spec.instanceLimit"]),
    ("account.yaml", {"spec.webhook": {"url": "ftp://example"}}, ["spec.webhook.url"]),
    (
        "account.yaml",
        {"spec.budget.monthly": "0"},
        ["spec.budget.monthly", "must be greater than zero"],
    ),
    (
        "account.yaml",
        {"spec.budget.monthly": "10.123"},
        ["spec.budget.monthly", "must not be finer than the currency's minor unit"],
    ),
    (
        "account.yaml",
        {"spec.budget.monthly": DELETE},
        ["spec.budget.monthly", "set monthly, namespaces, or both"],
    ),
    (
        "account.yaml",
        {"spec.budget.namespaces": [{"namespace": "elsewhere", "monthly": "5"}]},
        ["spec.budget.namespaces", "must be one of spec.namespaces"],
    ),
    (
        "account.yaml",
        {"spec.budget.enforcement": "Stop"},
        ["spec.budget.enforcement", "Unsupported value"],
    ),
    ("account.yaml", {"spec.budget.notifyAtPercent": [120]}, ["spec.budget.notifyAtPercent[0]"]),
    ("account.yaml", {"spec.runwayNoticeHours": [0]}, ["spec.runwayNoticeHours[0]"]),
]


@pytest.mark.parametrize(
    ("example", "changes", "words"),
    INVALID,
    ids=[f"{e.split('.')[0]}:{','.join(c)}" for e, c, _ in INVALID],
)
def test_invalid_manifest_is_rejected_naming_the_field(
    testbed: Testbed, namespace: str, example: str, changes: dict, words: list[str]
) -> None:
    doc = localise(load(example), namespace)
    for path, value in changes.items():
        set_path(doc, path, value)
    proc = apply(testbed, doc)
    assert proc.returncode != 0, f"accepted: {yaml.safe_dump(doc)}"
    for word in words:
        assert word in proc.stderr, f"{word!r} not in: {proc.stderr}"


def test_spot_price_above_pay_as_you_go_is_rejected(testbed: Testbed) -> None:
    doc = localise(load("pricebook.yaml"), "unused")
    doc["spec"]["gpus"][0]["spotPerHour"] = "99.00"
    proc = apply(testbed, doc)
    assert proc.returncode != 0
    assert "spec.gpus[0].spotPerHour" in proc.stderr
    assert "spotPerHour must not exceed payAsYouGoPerHour" in proc.stderr


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.gpu.product", "NVIDIA-H100-80GB-HBM3", "gpu.product is immutable"),
        ("spec.storage.quotaGi", 10, "quotaGi cannot shrink"),
    ],
)
def test_immutable_fields(
    testbed: Testbed, namespace: str, path: str, value: object, message: str
) -> None:
    doc = localise(load("gpuinstance-payg.yaml"), namespace)
    assert apply(testbed, doc).returncode == 0
    set_path(doc, path, value)
    proc = apply(testbed, doc)
    assert proc.returncode != 0
    assert path in proc.stderr and message in proc.stderr, proc.stderr


def test_submitted_recharge_cannot_be_edited(testbed: Testbed, namespace: str) -> None:
    doc = localise(load("recharge-online.yaml"), namespace)
    assert apply(testbed, doc).returncode == 0
    doc["spec"]["amount"] = "900.00"
    proc = apply(testbed, doc)
    assert proc.returncode != 0 and "spec is immutable once submitted" in proc.stderr


def test_pricebook_products_may_leave_out_spot_packages_and_model_prices(
    testbed: Testbed,
) -> None:
    """A GPU sold only by the hour, or not offered for models, is a normal product: the
    CRD accepts what the billing core accepts (docs/billing.md), a single package period
    too, and still checks a spot price when one is given."""
    doc = localise(load("pricebook.yaml"), "unused")
    gpus = doc["spec"]["gpus"]
    gpus[0] = {"product": gpus[0]["product"], "payAsYouGoPerHour": "19.80"}
    gpus[1] = {**gpus[1], "packages": {"day": "210.00"}}
    del gpus[1]["modelOnlinePerHour"]
    proc = apply(testbed, doc)
    try:
        assert proc.returncode == 0, proc.stderr
        gpus[1]["spotPerHour"] = "99.00"
        proc = apply(testbed, doc)
        assert proc.returncode != 0 and "spotPerHour must not exceed" in proc.stderr
    finally:
        delete(testbed, doc)


def test_a_budget_of_a_listed_namespace_applies(testbed: Testbed, namespace: str) -> None:
    doc = localise(load("account.yaml"), namespace)
    doc["spec"]["budget"]["namespaces"] = [{"namespace": namespace, "monthly": "100"}]
    proc = apply(testbed, doc)
    try:
        assert proc.returncode == 0, proc.stderr
        got = get_json(testbed, "account", doc["metadata"]["name"])
        assert got["spec"]["budget"]["namespaces"] == [{"namespace": namespace, "monthly": "100"}]
    finally:
        delete(testbed, doc)
