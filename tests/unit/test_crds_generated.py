"""crds/ is generated from hack/gen_crds.py and must not drift from it."""

import subprocess
import sys
from dataclasses import MISSING, fields
from typing import Any

import pytest
import yaml

from gpucloud.billing import CURRENCY_EXPONENTS
from gpucloud.billing import pricebook as billing
from gpucloud.crd import pricebook as crd
from gpucloud.testing.testbed import REPO


def test_crds_are_generated_from_source() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen_crds.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_crd_has_status_subresource_category_and_printer_columns() -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert "gpucloud" in crd["spec"]["names"]["categories"], path.name
        assert crd["spec"]["names"]["shortNames"], path.name
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}, path.name
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert "Age" in columns and len(columns) >= 3, path.name
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def _pricebook_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds" / "gpucloud.dev_pricebooks.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _required(model: type) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items() if f.is_required()}  # type: ignore[attr-defined]


def test_pricebook_schema_requires_only_product_and_pay_as_you_go() -> None:
    """A GPU sold only by the hour (no packages), without spot, or not offered for
    models (no modelOnlinePerHour) is a normal product (docs/billing.md)."""
    gpu = _pricebook_schema()["properties"]["gpus"]["items"]
    assert set(gpu["required"]) == _required(crd.GPUPrice) == {"product", "payAsYouGoPerHour"}
    assert set(gpu["properties"]) == {f.alias or n for n, f in crd.GPUPrice.model_fields.items()}
    packages = gpu["properties"]["packages"]
    assert "required" not in packages and not _required(crd.Packages)
    # the spot rule only applies when a spot price is given; the others name what a
    # fractional product takes (docs/fractional-gpus.md), an omitted kind being whole
    rule, *kinds = gpu["x-kubernetes-validations"]
    assert rule["rule"].startswith("!has(self.spotPerHour) || ")
    assert all("has(self.kind)" in k["rule"] or "has(self.resource)" in k["rule"] for k in kinds)


PRICE_TYPES = [
    (crd.PriceBookSpec, billing.PriceBook),
    (crd.GPUPrice, billing.GPUPrice),
    (crd.Packages, billing.GPUPackages),
    (crd.StoragePrices, billing.StoragePrices),
    (crd.ModelPrices, billing.ModelPrices),
]


@pytest.mark.parametrize(("model", "data"), PRICE_TYPES, ids=lambda t: t.__name__)
def test_the_billing_core_prices_hold_every_field_of_the_spec(model: Any, data: Any) -> None:
    """The CRD model is the one model of a price book; the billing core's types are the
    plain values it is turned into: the same fields, absent ("not offered") exactly where
    the spec may leave them out, and no default of their own (defaults are the model's)."""
    assert {f.name for f in fields(data)} == set(model.model_fields)
    for f in fields(data):
        spec_field = model.model_fields[f.name]
        offered_only_if_given = spec_field.default is None and not spec_field.is_required()
        assert (f.default is None) == offered_only_if_given, f.name
        assert f.default is None or f.default is MISSING, f.name


def test_recharge_amount_is_at_most_the_finest_minor_unit() -> None:
    crd = yaml.safe_load((REPO / "crds" / "gpucloud.dev_recharges.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["properties"]["amount"]["x-kubernetes-validations"]]
    assert "self.matches('^[0-9]+([.][0-9]{1,2})?$')" in rules
    assert max(CURRENCY_EXPONENTS.values()) == 2  # the CEL rule's 2 places
    assert "voucherRef" in spec["properties"]["bankTransfer"]["required"]


# Short names of the built-in kinds kubectl resolves first (kubectl api-resources).
BUILTIN_SHORT_NAMES = {
    "cs", "cm", "ep", "ev", "limits", "ns", "no", "pvc", "pv", "po", "rc", "quota", "sa", "svc",
    "crd", "crds", "ds", "deploy", "rs", "sts", "hpa", "cj", "csr", "ing", "netpol", "pdb", "pc",
    "sc", "ingclass", "ipa", "vac",
}  # fmt: skip


def test_short_names_are_unique_and_shadow_no_builtin_kind() -> None:
    seen: dict[str, str] = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        names = yaml.safe_load(path.read_text())["spec"]["names"]
        for short in names["shortNames"]:
            assert short not in BUILTIN_SHORT_NAMES, f"{names['kind']}: {short!r} is built in"
            assert seen.setdefault(short, names["kind"]) == names["kind"], short
    assert seen["rch"] == "Recharge"  # `rc` is ReplicationController's


def test_currencies_are_exactly_those_the_billing_core_rounds() -> None:
    for crd_file in ("gpucloud.dev_accounts.yaml", "gpucloud.dev_pricebooks.yaml"):
        crd = yaml.safe_load((REPO / "crds" / crd_file).read_text())
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        currency = spec["properties"]["currency"]
        assert currency["enum"] == sorted(CURRENCY_EXPONENTS), crd_file
        assert currency["default"] == "CNY" and "pattern" not in currency


def test_the_charts_currency_is_one_the_billing_core_rounds() -> None:
    import json

    schema = json.loads((REPO / "charts" / "gpucloud" / "values.schema.json").read_text())
    assert schema["properties"]["currency"]["enum"] == sorted(CURRENCY_EXPONENTS)
