"""crds/ is generated from hack/gen_crds.py and must not drift from it."""

import subprocess
import sys

import yaml

from gpucloud.billing import CURRENCY_EXPONENTS, GPUPackages, GPUPrice
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


def test_pricebook_schema_requires_what_the_billing_core_requires() -> None:
    """The PriceBook CRD and the billing core agree on what is optional: a GPU sold only
    by the hour (no packages), without spot, or not offered for models (no
    modelOnlinePerHour) is a normal product (docs/billing.md)."""
    gpu = _pricebook_schema()["properties"]["gpus"]["items"]
    assert set(gpu["required"]) == _required(GPUPrice) == {"product", "payAsYouGoPerHour"}
    assert set(gpu["properties"]) == {f.alias or n for n, f in GPUPrice.model_fields.items()}
    packages = gpu["properties"]["packages"]
    assert "required" not in packages and not _required(GPUPackages)
    # the spot rule only applies when a spot price is given
    (rule,) = gpu["x-kubernetes-validations"]
    assert rule["rule"].startswith("!has(self.spotPerHour) || ")


def test_recharge_amount_is_at_most_the_finest_minor_unit() -> None:
    crd = yaml.safe_load((REPO / "crds" / "gpucloud.dev_recharges.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["properties"]["amount"]["x-kubernetes-validations"]]
    assert "self.matches('^[0-9]+([.][0-9]{1,2})?$')" in rules
    assert max(CURRENCY_EXPONENTS.values()) == 2  # the CEL rule's 2 places
    assert "voucherRef" in spec["properties"]["bankTransfer"]["required"]
