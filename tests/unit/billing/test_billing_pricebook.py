from decimal import Decimal

import pytest
import yaml
from billing_oracles import A100, H100, sample_pricebook, sample_spec

from gpucloud.billing import (
    BillingMode,
    NotOffered,
    PackagePeriod,
    PriceBook,
    PriceBookError,
    UnknownProduct,
)

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


def test_from_resource_reads_the_documented_yaml() -> None:
    pb = PriceBook.from_resource(yaml.safe_load(RESOURCE))
    gpu = pb.gpu_price(A100)
    assert pb.currency == "CNY"
    assert gpu.pay_as_you_go_per_hour == Decimal("9.80")
    assert gpu.hourly(BillingMode.SPOT) == Decimal("3.90")
    assert gpu.package_price(PackagePeriod.MONTH) == Decimal("4599.00")
    assert pb.storage.instance_per_gb_hour == Decimal("0.0004")
    assert pb.models.per_1k_tokens == Decimal("0.0020")
    assert pb.models.personal_per_request_second == Decimal("0.0030")
    # written back as it was read: camelCase, strings, places kept
    assert pb.to_spec() == yaml.safe_load(RESOURCE)["spec"]


def test_snake_case_construction_and_defaults() -> None:
    pb = sample_pricebook()
    h100 = pb.gpu_price(H100)
    assert h100.online_per_hour == Decimal("19.99")  # falls back to pay-as-you-go
    with pytest.raises(NotOffered, match=r"spot is not offered.*H100"):
        h100.hourly(BillingMode.SPOT)
    with pytest.raises(NotOffered, match="day package is not offered"):
        h100.package_price(PackagePeriod.DAY)
    assert PriceBook.from_spec({**sample_spec(), "currency": "JPY"}).currency == "JPY"
    spec = sample_spec()
    del spec["currency"]
    assert PriceBook.from_spec(spec).currency == "CNY"


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
        PriceBook.from_resource(obj)
    assert "spec.gpus[0].payAsYouGoPerHour: 9.8 is a YAML/JSON float" in str(err.value)
    assert 'quote it, e.g. "9.8"' in str(err.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["gpus"][0].update(spotPerHour="10.00"), "must be <= payAsYouGoPerHour"),
        (lambda s: s["storage"].update(imagePerGBHour="-1"), "spec.storage.imagePerGBHour"),
        (lambda s: s["models"].update(perImage="0.0000001"), "7 decimal places"),
        (lambda s: s["models"].update(perVideo="NaN"), "spec.models.perVideo"),
        (lambda s: s["models"].update(perVideo=True), "not a boolean"),
        (lambda s: s.update(currency="GBP"), "spec.currency: 'GBP' is not a currency"),
        (lambda s: s["gpus"].append(dict(s["gpus"][0])), "listed twice"),
        (lambda s: s.update(gpus=[]), "spec.gpus"),
        (lambda s: s["storage"].update(instancePerGbHour="1"), "Extra inputs"),
        (lambda s: s["models"].pop("per1KTokens"), "spec.models.per1KTokens: Field required"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    spec = sample_spec()
    mutate(spec)
    with pytest.raises(PriceBookError, match=message):
        PriceBook.from_spec(spec)


def test_resource_shape_errors() -> None:
    with pytest.raises(PriceBookError, match="kind: expected PriceBook"):
        PriceBook.from_resource({"kind": "Instance", "spec": sample_spec()})
    with pytest.raises(PriceBookError, match="spec: required"):
        PriceBook.from_resource({"kind": "PriceBook"})


def test_integer_prices_are_exact_and_accepted() -> None:
    spec = sample_spec()
    spec["gpus"][0]["packages"]["day"] = 199
    assert PriceBook.from_spec(spec).gpu_price(A100).package_price(PackagePeriod.DAY) == 199
