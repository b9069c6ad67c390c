"""PriceBook: prices of GPU time, storage and models (cluster-wide, set by admins)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field

from gpucloud.crd.common import (
    GPU_PRODUCT_PATTERN,
    Currency,
    DecimalStr,
    PositiveDecimal,
    StatusBase,
    money,
)
from gpucloud.crd.k8s import LISTED, Cel, ListType, Spec
from gpucloud.crd.schema import Column, Definition


def _package(p: str) -> Any:
    return Field(
        default=None,
        description=money(f"Price of one {p} package per GPU; omitted: no {p} package."),
    )


class Packages(Spec):
    day: PositiveDecimal | None = _package("day")
    week: PositiveDecimal | None = _package("week")
    month: PositiveDecimal | None = _package("month")


class GPUPrice(Spec):
    cel = (
        Cel(
            "!has(self.spotPerHour) || double(self.spotPerHour) <= double(self.payAsYouGoPerHour)",
            "spotPerHour must not exceed payAsYouGoPerHour",
            ".spotPerHour",
            lambda s: (
                s.spot_per_hour is None
                or Decimal(s.spot_per_hour) <= Decimal(s.pay_as_you_go_per_hour)
            ),
        ),
    )
    # what the billing core requires (docs/billing.md): spot, packages and the model
    # price are optional ("not offered", or the pay-as-you-go price for models)
    product: str = Field(
        description="GPU product (nvidia.com/gpu.product label value).",
        pattern=GPU_PRODUCT_PATTERN,
    )
    pay_as_you_go_per_hour: PositiveDecimal = Field(
        description=money("Pay-as-you-go price per GPU-hour.")
    )
    spot_per_hour: PositiveDecimal | None = Field(
        default=None,
        description=money("Spot price per GPU-hour; omitted: no spot instances of this product."),
    )
    packages: Packages | None = Field(
        default=None,
        description="Prepaid package prices per GPU (day 24 h, week 7x24 h, month 30x24 h); "
        "they include the instance storage. Omitted: the product is sold by the hour only.",
    )
    model_online_per_hour: PositiveDecimal | None = Field(
        default=None,
        description=money(
            "Private model / deployment price per GPU-hour online; omitted: payAsYouGoPerHour."
        ),
    )


class StoragePrices(Spec):
    instance_per_gb_hour: DecimalStr = Field(
        alias="instancePerGBHour", description=money("Instance storage per GiB-hour of quota.")
    )
    cloud_disk_per_gb_hour: DecimalStr = Field(
        alias="cloudDiskPerGBHour", description=money("Cloud disk per GiB-hour used.")
    )
    image_per_gb_hour: DecimalStr = Field(
        alias="imagePerGBHour", description=money("Image storage per GiB-hour used.")
    )


class ModelPrices(Spec):
    per_1k_tokens: DecimalStr = Field(
        alias="per1KTokens", description=money("Official models: per 1000 tokens.")
    )
    per_image: DecimalStr = Field(description=money("Official models: per generated image."))
    per_video: DecimalStr = Field(description=money("Official models: per generated video."))
    personal_per_request_second: DecimalStr = Field(
        description=money("Personal public models: per second of request runtime.")
    )


class PriceBookSpec(Spec):
    currency: Annotated[Currency, LISTED] = Field(
        default="CNY", description="ISO 4217 currency code: one the billing core rounds."
    )
    gpus: Annotated[list[GPUPrice], ListType("map", ("product",))] = Field(
        description="One entry per GPU product offered.", min_length=1, max_length=64
    )
    storage: StoragePrices
    models: ModelPrices


class PriceBookStatus(StatusBase):
    products: int | None = Field(default=None, description="GPU products priced.", ge=0)


DEFINITION = Definition(
    kind="PriceBook",
    plural="pricebooks",
    scope="Cluster",
    short_names=["pb"],
    description="Prices of GPU time, storage and models (cluster-wide, set by admins).",
    spec=PriceBookSpec,
    status=PriceBookStatus,
    columns=[
        Column("Currency", ".spec.currency"),
        Column("Products", ".status.products", "integer"),
    ],
)
