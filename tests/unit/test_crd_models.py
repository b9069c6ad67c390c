"""The CRD models: they read every example, emit exactly the committed schemas, and
refuse a bad spec naming the field and the rule."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gpucloud.crd import DEFINITIONS, SpecError, parse
from gpucloud.crd.schema import crd_manifest
from gpucloud.kube_names import GROUP, VERSION
from gpucloud.testing.testbed import REPO

BY_KIND = {d.kind: d for d in DEFINITIONS}
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _docs(path: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in BY_KIND]


def _within(small: Any, big: Any, path: str = "spec") -> None:
    """Everything the manifest says survives the round trip (defaults may be added)."""
    if isinstance(small, dict):
        for k, v in small.items():
            assert k in big, f"{path}.{k} lost"
            _within(v, big[k], f"{path}.{k}")
    else:
        assert small == big, path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_round_trips(path: Any) -> None:
    docs = _docs(path)
    assert docs, f"{path.name}: no gpucloud object"
    for doc in docs:
        d = BY_KIND[doc["kind"]]
        spec = parse(d.spec, doc["spec"])
        wire = spec.dump()
        _within(doc["spec"], wire)
        assert parse(d.spec, wire) == spec
        if "status" in doc:
            parse(d.status, doc["status"], root="status")


def test_operator_fixture_instances_parse() -> None:
    """The shape tests/operator's World builds (every billing mode)."""
    gi = BY_KIND["GPUInstance"].spec
    for billing in ({"mode": "PayAsYouGo"}, {"mode": "Spot"}, {"mode": "Package", "period": "Day"}):
        spec = {"gpu": {"product": "NVIDIA-A100"}, "billing": billing, "state": "Running"}
        parsed = parse(gi, spec)
        assert parsed.gpu.count == 1 and parsed.quota_gi == 50  # the CRD defaults


@pytest.mark.parametrize("d", DEFINITIONS, ids=lambda d: d.plural)
def test_emitted_schema_is_the_committed_crd(d: Any) -> None:
    committed = yaml.safe_load((REPO / "crds" / f"{GROUP}_{d.plural}.yaml").read_text())
    assert crd_manifest(d, GROUP, VERSION) == committed


def test_schemas_are_structural() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert not {"$ref", "anyOf", "allOf", "oneOf", "nullable"} & set(node)
            if "properties" in node or "items" in node:
                assert "type" in node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for d in DEFINITIONS:
        walk(crd_manifest(d, GROUP, VERSION))


def _refusal(kind: str, spec: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as exc:
        parse(BY_KIND[kind].spec, spec)
    return str(exc.value)


GPU = {"product": "NVIDIA-A100"}


def test_object_rule_names_its_field_and_rule() -> None:
    msg = _refusal("GPUInstance", {"gpu": GPU, "billing": {"mode": "Package"}})
    assert msg.startswith("spec.billing.period: period is required when mode is Package")
    assert "(rule: (self.mode == 'Package') == has(self.period))" in msg


def test_bounds_patterns_and_required_fields_name_the_field() -> None:
    msg = _refusal("GPUInstance", {"gpu": {"product": "A100", "count": 9}, "billing": {}})
    assert msg.startswith("spec.gpu.count: Input should be less than or equal to 8")
    assert _refusal("GPUInstance", {"gpu": GPU}).startswith("spec.billing: Field required")
    msg = _refusal("CloudDisk", {"capacityGi": 0})
    assert msg.startswith("spec.capacityGi: Input should be greater than or equal to 1")
    msg = _refusal("Image", {"sourceInstance": "Not_A_Name"})
    assert msg.startswith("spec.sourceInstance: String should match pattern")


def test_field_rules_and_nested_object_rules() -> None:
    base = {"model": "m", "image": "i", "gpu": GPU}
    msg = _refusal("ModelDeployment", {**base, "minReplicas": 3, "maxReplicas": 2})
    assert msg.startswith("spec.minReplicas: minReplicas must not exceed maxReplicas")
    msg = _refusal("ModelDeployment", {**base, "visibility": "Public"})
    assert msg.startswith("spec.pricing: pricing is required for public models")
    pb = yaml.safe_load((REPO / "examples" / "pricebook.yaml").read_text())["spec"]
    pb["gpus"][0]["spotPerHour"] = "999999"
    msg = _refusal("PriceBook", pb)
    assert msg.startswith("spec.gpus[0].spotPerHour: spotPerHour must not exceed")
    rc = {"account": "acme", "method": "Online", "amount": "0"}
    assert _refusal("Recharge", rc).startswith("spec.amount: must be greater than zero")
    msg = _refusal("Recharge", {**rc, "amount": "1.005"})
    assert msg.startswith("spec.amount: must not be finer than the currency's minor unit")


def test_transition_rules_are_left_to_the_api_server() -> None:
    """self == oldSelf cannot be checked without the old object: parse accepts."""
    parse(BY_KIND["Image"].spec, {"sourceInstance": "box"})
