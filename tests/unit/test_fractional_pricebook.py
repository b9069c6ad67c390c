"""Price-book products that are MIG profiles or time-sliced shares (issue 19): the kind
and resource fields, the rules that keep names, kinds and resources agreeing (the same
CEL rules the API server applies), and the naming of NVIDIA's resources and devices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gpucloud import gpu_kinds as gk
from gpucloud.billing import PriceBookError
from gpucloud.crd.pricebook import PriceBookSpec, price_book
from gpucloud.crd.schema import object_schema

H100 = "NVIDIA-H100-80GB-HBM3"
BASE: dict[str, Any] = {
    "storage": {"instancePerGBHour": "0.0005", "cloudDiskPerGBHour": "0.0005",
                "imagePerGBHour": "0.0005"},
    "models": {"per1KTokens": "0.01", "perImage": "0.1", "perVideo": "1",
               "personalPerRequestSecond": "0.001"},
}  # fmt: skip


def _book(*gpus: dict[str, Any]) -> Any:
    return price_book({**BASE, "gpus": list(gpus)})


def test_mig_and_shared_products_carry_their_kind_and_resource() -> None:
    pb = _book(
        {"product": H100, "payAsYouGoPerHour": "19.80"},
        {"product": f"{H100}-MIG-1g.10gb", "kind": "mig", "resource": "nvidia.com/mig-1g.10gb",
         "payAsYouGoPerHour": "2.83"},
        {"product": f"{H100}-MIG-3g.40gb", "kind": "mig", "payAsYouGoPerHour": "8.51"},
        {"product": f"{H100}-SHARED", "kind": "shared", "resource": "nvidia.com/gpu.shared",
         "payAsYouGoPerHour": "4.95"},
    )  # fmt: skip
    got = {g.product: (g.unit_kind, g.unit_resource, g.pay_as_you_go_per_hour) for g in pb.gpus}
    assert got == {
        H100: ("whole", "nvidia.com/gpu", Decimal("19.80")),
        f"{H100}-MIG-1g.10gb": ("mig", "nvidia.com/mig-1g.10gb", Decimal("2.83")),
        # the single strategy: MIG devices are nvidia.com/gpu on a node labelled so
        f"{H100}-MIG-3g.40gb": ("mig", "nvidia.com/gpu", Decimal("8.51")),
        f"{H100}-SHARED": ("shared", "nvidia.com/gpu.shared", Decimal("4.95")),
    }


@pytest.mark.parametrize(
    ("gpu", "field", "says"),
    [
        ({"product": H100, "resource": "nvidia.com/gpu.shared"}, ".resource",
         "a whole GPU takes resource nvidia.com/gpu"),
        ({"product": f"{H100}-MIG-1g.10gb", "kind": "mig", "resource": "nvidia.com/gpu.shared"},
         ".kind", "sold as kind shared"),
        ({"product": f"{H100}-MIG-2g.20gb", "kind": "mig", "resource": "nvidia.com/mig-1g.10gb"},
         ".resource", "<GPU>-MIG-<profile>"),
        ({"product": H100, "kind": "mig"}, ".product", "named <GPU>-MIG-<profile>"),
        ({"product": H100, "kind": "shared", "resource": "nvidia.com/gpu.shared"}, ".product",
         "named <GPU>-SHARED"),
        ({"product": f"{H100}-SHARED"}, ".kind", "not a whole GPU"),
        ({"product": f"{H100}-MIG-1g.10gb", "kind": "whole"}, ".kind", "not a whole GPU"),
        ({"product": H100, "resource": "nvidia.com/mig-9g.10gb", "kind": "mig"}, ".resource",
         "should match"),
        ({"product": H100, "kind": "half"}, ".kind", "whole"),
    ],
)  # fmt: skip
def test_refusals_name_the_field_and_the_rule(gpu: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(PriceBookError) as err:
        _book({**gpu, "payAsYouGoPerHour": "1"})
    assert f"spec.gpus[0]{field}" in str(err.value) and says in str(err.value)


def test_the_crd_carries_the_same_rules_on_the_api_server() -> None:
    schema = object_schema(PriceBookSpec)["properties"]["gpus"]["items"]
    assert schema["properties"]["kind"]["enum"] == ["whole", "mig", "shared"]
    assert "default" not in schema["properties"]["resource"]  # omitted: nvidia.com/gpu
    paths = [r.get("fieldPath") for r in schema["x-kubernetes-validations"]]
    assert {".resource", ".product", ".kind"} <= set(paths)


def test_names_of_resources_products_and_devices() -> None:
    assert gk.node_product(f"{H100}-MIG-1g.10gb", "nvidia.com/mig-1g.10gb") == H100
    assert gk.node_product(f"{H100}-MIG-1g.10gb", "nvidia.com/gpu") == f"{H100}-MIG-1g.10gb"
    assert gk.offered_product(H100, "nvidia.com/mig-1g.10gb") == f"{H100}-MIG-1g.10gb"
    assert gk.offered_product(f"{H100}-SHARED", "nvidia.com/gpu.shared") == f"{H100}-SHARED"
    assert gk.device_kind("MIG-0b1c") is gk.GPUKind.MIG
    assert gk.device_kind("MIG-GPU-0b1c/1/0") is gk.GPUKind.MIG  # the older MIG UUID form
    assert gk.device_kind("GPU-0b1c::3") is gk.GPUKind.SHARED
    assert gk.device_kind("GPU-0b1c") is gk.GPUKind.WHOLE
    assert gk.replica_parent("GPU-0b1c::3") == "GPU-0b1c"
    assert [gk.is_gpu_resource(r) for r in ("nvidia.com/gpu", "nvidia.com/gpu.shared",
            "nvidia.com/mig-1g.10gb", "nvidia.com/mig-1g", "example.com/gpu")] == [
        True, True, True, False, False]  # fmt: skip
