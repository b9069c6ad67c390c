"""The operator and the CRDs agree: what the committed CRD schema lists is what the
models the operator (and the API, gateway, CLI) parse with read, and the models refuse
what the schema refuses."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from gpucloud_operator import accounts, models, storage_items
from gpucloud_operator.instances import admission, core
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gpucloud.crd import DEFINITIONS, SpecError, account, parse
from gpucloud.crd import pricebook as crd_pricebook
from gpucloud.crd.k8s import Listed
from gpucloud.crd.schema import model_of
from gpucloud.kube_names import GROUP
from gpucloud.testing.testbed import REPO

BY_KIND = {d.kind: d for d in DEFINITIONS}


def committed_spec_schema(kind: str) -> dict[str, Any]:
    d = BY_KIND[kind]
    crd = yaml.safe_load((REPO / "crds" / f"{GROUP}_{d.plural}.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_fields(node: dict[str, Any], path: str = "spec") -> list[tuple[str, dict, bool]]:
    """(path, schema, required) of every field under an object schema, nested included."""
    out = []
    required = set(node.get("required", []))
    for key, sub in node.get("properties", {}).items():
        out.append((f"{path}.{key}", sub, key in required))
        inner = sub["items"] if sub["type"] == "array" else sub
        if inner.get("type") == "object":
            out += schema_fields(inner, f"{path}.{key}")
    return out


CASES = [
    pytest.param(kind, path, schema, required, id=path.replace("spec", kind, 1))
    for kind in BY_KIND
    for path, schema, required in schema_fields(committed_spec_schema(kind))
]


def model_field(model: type[BaseModel], path: str) -> Any:
    """The model field a dotted wire path (camelCase) names; fails if there is none."""
    owner: Any = model
    info = None
    for part in path.split(".")[1:]:
        assert owner is not None, f"{path}: {part} is under a field that holds no model"
        by_alias = {(f.alias or n): f for n, f in owner.model_fields.items()}
        assert part in by_alias, f"{path}: the model {owner.__name__} has no field {part}"
        info = by_alias[part]
        owner = model_of(info.annotation)
    return info


@pytest.mark.parametrize(("kind", "path", "schema", "required"), CASES)
def test_every_field_the_crd_lists_is_one_the_model_reads(
    kind: str, path: str, schema: dict, required: bool
) -> None:
    info = model_field(BY_KIND[kind].spec, path)
    listed = info.is_required() or any(isinstance(m, Listed) for m in info.metadata)
    assert listed == required, f"{path}: required in the CRD {required}, in the model {listed}"
    if "default" in schema:
        assert info.default == schema["default"], path


@pytest.mark.parametrize("kind", sorted(BY_KIND))
def test_the_model_reads_no_field_the_crd_does_not_list(kind: str) -> None:
    listed = {p for p, _, _ in schema_fields(committed_spec_schema(kind))}

    def walk(model: type[BaseModel], path: str) -> None:
        for name, f in model.model_fields.items():
            here = f"{path}.{f.alias or name}"
            assert here in listed, f"{here} is read but the CRD does not list it"
            inner = model_of(f.annotation)
            if inner is not None:
                walk(inner, here)

    walk(BY_KIND[kind].spec, "spec")


def test_the_readers_parse_with_the_models_the_crds_come_from() -> None:
    assert accounts.AccountSpec is core.AccountSpec is BY_KIND["Account"].spec
    assert accounts.RechargeSpec is BY_KIND["Recharge"].spec
    assert accounts.RechargeReviewSpec is BY_KIND["RechargeReview"].spec
    assert core.GPUInstanceSpec is BY_KIND["GPUInstance"].spec
    assert models.ModelDeploymentSpec is BY_KIND["ModelDeployment"].spec
    assert storage_items.SPECS["clouddisks"] is BY_KIND["CloudDisk"].spec
    assert storage_items.SPECS["images"] is BY_KIND["Image"].spec
    assert crd_pricebook.PriceBookSpec is BY_KIND["PriceBook"].spec
    for reader in (accounts, core, storage_items, models):
        assert reader.price_book is crd_pricebook.price_book  # type: ignore[attr-defined]
    assert not hasattr(admission, "_account_obj")  # the limit comes from the parsed spec


ACCOUNT = committed_spec_schema("Account")["properties"]


def schema_accepts(field: str, value: Any) -> bool:
    s = ACCOUNT[field]
    if "enum" in s:
        return value in s["enum"]
    return s.get("minimum", value) <= value <= s.get("maximum", value)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.one_of(st.none(), st.integers(-3, 10_003)),
    hours=st.one_of(st.none(), st.integers(-3, 8_763)),
    currency=st.one_of(st.none(), st.sampled_from(["CNY", "EUR", "JPY", "USD", "GBP", "cny", ""])),
)
def test_the_account_model_refuses_exactly_what_the_crd_schema_refuses(
    limit: int | None, hours: int | None, currency: str | None
) -> None:
    """Bounds and the currency enum, read from the committed CRD: the operator's parse
    accepts a value iff the API server's schema would, and an absent field is the
    schema's default."""
    given_fields = {"instanceLimit": limit, "lowBalanceWarningHours": hours, "currency": currency}
    spec: dict[str, Any] = {"namespaces": ["team-a"]}
    spec |= {k: v for k, v in given_fields.items() if v is not None}
    expect = all(schema_accepts(k, v) for k, v in spec.items() if k != "namespaces")
    try:
        parsed = parse(account.AccountSpec, spec)
    except SpecError as exc:
        assert not expect, str(exc)
        bad = [k for k, v in spec.items() if k != "namespaces" and not schema_accepts(k, v)]
        assert all(f"spec.{k}:" in str(exc) for k in bad)  # each refused field is named
        return
    assert expect
    read = {
        "instanceLimit": parsed.instance_limit,
        "lowBalanceWarningHours": parsed.low_balance_warning_hours,
        "currency": parsed.currency,
    }
    for key, value in given_fields.items():
        # lowBalanceWarningHours has no default (a deprecated alias of runwayNoticeHours)
        assert read[key] == (value if value is not None else ACCOUNT[key].get("default"))
