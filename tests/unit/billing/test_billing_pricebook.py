from decimal import Decimal
from typing import Any

import pytest
import yaml
from billing_oracles import A100, H100, sample_pricebook, sample_spec
from pydantic import BaseModel

from gpucloud.billing import (
    BillingMode,
    NotOffered,
    PackagePeriod,
    PriceBookError,
    UnknownProduct,
)
from gpucloud.crd.pricebook import price_book, read

RESOURCE = """
apiVersion: gpucloud.io/v1alpha1
kind: PriceBook
metadata: {name: default}
spec:
  currency: CNY
  gpus:
    - product: NVIDIA-A100-SXM4-80GB
      payAsYouGoPerHour: "9.80"
      spotPerHour: "3.90"
      packages: {day: "199.00", week: "1199.00", month: "4599.00"}
      modelOnlinePerHour: "9.80"
  storage:
    instancePerGBHour: "0.0004"
    cloudDiskPerGBHour: "0.0003"
    imagePerGBHour: "0.0002"
  models:
    per1KTokens: "0.0020"
    perImage: "0.0800"
    perVideo: "1.2000"
    personalPerRequestSecond: "0.0030"
"""


def test_the_documented_yaml_becomes_exact_prices() -> None:
    pb = price_book(yaml.safe_load(RESOURCE))
    gpu = pb.gpu_price(A100)
    assert pb.currency == "CNY"
    assert gpu.pay_as_you_go_per_hour == Decimal("9.80")
    assert gpu.hourly(BillingMode.SPOT) == Decimal("3.90")
    assert gpu.package_price(PackagePeriod.MONTH) == Decimal("4599.00")
    assert pb.storage.instance_per_gb_hour == Decimal("0.0004")
    assert pb.models.per_1k_tokens == Decimal("0.0020")
    assert pb.models.personal_per_request_second == Decimal("0.0030")
    # written back as it was read: camelCase, strings, places kept
    assert read(yaml.safe_load(RESOURCE)).dump() == yaml.safe_load(RESOURCE)["spec"]


def test_snake_case_construction_and_defaults() -> None:
    pb = sample_pricebook()
    h100 = pb.gpu_price(H100)
    assert h100.online_per_hour == Decimal("19.99")  # falls back to pay-as-you-go
    with pytest.raises(NotOffered, match=r"spot is not offered.*H100"):
        h100.hourly(BillingMode.SPOT)
    with pytest.raises(NotOffered, match="day package is not offered"):
        h100.package_price(PackagePeriod.DAY)
    assert price_book({**sample_spec(), "currency": "JPY"}).currency == "JPY"
    spec = sample_spec()
    del spec["currency"]
    assert price_book(spec).currency == "CNY"  # the CRD model's default


def test_unknown_product_names_it_and_the_known_ones() -> None:
    with pytest.raises(UnknownProduct) as err:
        sample_pricebook().gpu_price("Tesla-T4")
    assert str(err.value) == (
        f"GPU product 'Tesla-T4' is not in the price book (known: {A100}, {H100})"
    )
    assert isinstance(err.value, LookupError)


def test_yaml_float_is_refused_with_a_hint_to_quote_it() -> None:
    obj = yaml.safe_load(RESOURCE.replace('payAsYouGoPerHour: "9.80"', "payAsYouGoPerHour: 9.8"))
    with pytest.raises(PriceBookError) as err:
        price_book(obj)
    assert "spec.gpus[0].payAsYouGoPerHour: 9.8 is a YAML/JSON float" in str(err.value)
    assert 'quote it, e.g. "9.8"' in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["gpus"][0].update(spotPerHour="10.00"),
            r"spec.gpus\[0\].spotPerHour: spotPerHour must not exceed payAsYouGoPerHour",
        ),
        (lambda s: s["storage"].update(imagePerGBHour="-1"), "spec.storage.imagePerGBHour"),
        (lambda s: s["models"].update(perImage="0.0000001"), "spec.models.perImage: String"),
        (lambda s: s["models"].update(perVideo="NaN"), "spec.models.perVideo"),
        (lambda s: s["models"].update(perVideo=True), "not a boolean"),
        (lambda s: s.update(currency="GBP"), "spec.currency: Input should be 'CNY', 'EUR'"),
        (lambda s: s["gpus"].append(dict(s["gpus"][0])), "listed twice"),
        (lambda s: s.update(gpus=[]), "spec.gpus"),
        (lambda s: s["gpus"][0]["packages"].update(day="0"), "must be greater than zero"),
        (lambda s: s["gpus"][0]["packages"].update(day=199), 'quote it, e.g. "199"'),
        (lambda s: s["models"].pop("per1KTokens"), "spec.models.per1KTokens: Field required"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    spec = sample_spec()
    mutate(spec)
    with pytest.raises(PriceBookError, match=message):
        price_book(spec)


def test_resource_shape_errors() -> None:
    with pytest.raises(PriceBookError, match="kind: expected PriceBook"):
        price_book({"kind": "Instance", "spec": sample_spec()})
    with pytest.raises(PriceBookError, match="spec: required"):
        price_book({"kind": "PriceBook"})


def test_unknown_fields_are_pruned_as_the_api_server_does() -> None:
    """The CRD schema is structural: the API server drops unknown fields, so the model
    ignores them too (kubectl's strict field validation reports them at apply time)."""
    spec = sample_spec()
    spec["storage"]["instancePerGbHour"] = "1"  # a typo of instancePerGBHour
    assert price_book(spec).storage.instance_per_gb_hour == Decimal("0.0004")


def test_every_price_of_the_spec_reaches_the_billing_core_exactly() -> None:
    """The one conversion (PriceBookSpec.prices) carries every field, as an exact Decimal."""
    spec = read(yaml.safe_load(RESOURCE))
    seen: list[str] = []

    def walk(model: Any, value: Any, path: str) -> None:
        for name in type(model).model_fields:
            given, got = getattr(model, name), getattr(value, name)
            if isinstance(given, list):
                for i, (g, v) in enumerate(zip(given, got, strict=True)):
                    walk(g, v, f"{path}.{name}[{i}]")
            elif isinstance(given, BaseModel):
                walk(given, got, f"{path}.{name}")
            elif name in ("currency", "product", "kind", "resource"):
                assert got == given, path
            else:
                assert isinstance(got, Decimal) and got == Decimal(given), f"{path}.{name}"
                assert str(got) == given  # places kept: "9.80" stays 9.80
                seen.append(f"{path}.{name}")

    walk(spec, spec.prices(), "spec")
    assert len(seen) == 1 + 1 + 3 + 1 + 3 + 4  # every price in RESOURCE
