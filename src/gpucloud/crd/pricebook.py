"""PriceBook: prices of GPU time, storage and models (cluster-wide, set by admins).

``PriceBookSpec`` is the one model of a price book's spec: the CRD schema is generated
from it, and everything that reads a price book (operator, API, gateway, CLI) parses it
here (``read``) and hands the billing core the plain ``Decimal`` prices it rates with
(``PriceBookSpec.prices``, the one conversion). The direction is one-way: this room
builds the billing core's type; the billing core knows nothing of CRDs."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field

from gpucloud.billing import pricebook as billing
from gpucloud.billing.errors import PriceBookError
from gpucloud.crd.common import (
    GPU_PRODUCT_PATTERN,
    Currency,
    DecimalStr,
    PositiveDecimal,
    StatusBase,
    money,
)
from gpucloud.crd.k8s import LISTED, Cel, ListType, Spec, SpecError, parse
from gpucloud.crd.schema import Column, Definition
from gpucloud.gpu_kinds import (
    GPU_RESOURCE,
    MIG_INFIX,
    MIG_RESOURCE_PREFIX,
    RESOURCE_PATTERN,
    SHARED_RESOURCE,
    SHARED_SUFFIX,
    gpu_kind,
    mig_profile,
)


def _package(p: str) -> Any:
    return Field(
        default=None,
        description=money(f"Price of one {p} package per GPU; omitted: no {p} package."),
    )


class Packages(Spec):
    day: PositiveDecimal | None = _package("day")
    week: PositiveDecimal | None = _package("week")
    month: PositiveDecimal | None = _package("month")


# an omitted kind or resource, in CEL: the defaults the model's properties apply
_KIND = "(has(self.kind) ? self.kind : 'whole')"
_RES = f"(has(self.resource) ? self.resource : '{GPU_RESOURCE}')"


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
        # what a product is decides what it takes (gpucloud.gpu_kinds, docs/fractional-gpus.md)
        Cel(
            f"{_KIND} != 'whole' || {_RES} == '{GPU_RESOURCE}'",
            f"a whole GPU takes resource {GPU_RESOURCE}",
            ".resource",
            lambda s: s.unit_kind != "whole" or s.unit_resource == GPU_RESOURCE,
        ),
        Cel(
            f"!{_RES}.startsWith('{MIG_RESOURCE_PREFIX}') || ({_KIND} == 'mig' && "
            f"self.product.endsWith('{MIG_INFIX}' + {_RES}.substring({len(MIG_RESOURCE_PREFIX)})))",
            f"a {MIG_RESOURCE_PREFIX}<profile> resource is sold as kind mig, product "
            f"<GPU>{MIG_INFIX}<profile>",
            ".resource",
            lambda s: (
                (profile := mig_profile(s.unit_resource)) is None
                or (s.unit_kind == "mig" and s.product.endswith(MIG_INFIX + profile))
            ),
        ),
        Cel(
            f"{_KIND} != 'mig' || self.product.contains('{MIG_INFIX}')",
            f"a mig product is named <GPU>{MIG_INFIX}<profile>, as GPU Feature Discovery labels it",
            ".product",
            lambda s: s.unit_kind != "mig" or MIG_INFIX in s.product,
        ),
        Cel(
            f"{_KIND} != 'shared' || self.product.endsWith('{SHARED_SUFFIX}')",
            f"a shared product is named <GPU>{SHARED_SUFFIX}, as GPU Feature Discovery labels "
            "time-sliced nodes",
            ".product",
            lambda s: s.unit_kind != "shared" or s.product.endswith(SHARED_SUFFIX),
        ),
        Cel(
            f"{_KIND} != 'whole' || !(self.product.contains('{MIG_INFIX}') || "
            f"self.product.endsWith('{SHARED_SUFFIX}'))",
            f"a <GPU>{MIG_INFIX}<profile> or <GPU>{SHARED_SUFFIX} product is not a whole GPU: "
            "set kind",
            ".kind",
            lambda s: s.unit_kind != "whole" or gpu_kind(s.product) == "whole",
        ),
        Cel(
            f"{_RES} != '{SHARED_RESOURCE}' || {_KIND} == 'shared'",
            f"resource {SHARED_RESOURCE} is sold as kind shared",
            ".kind",
            lambda s: s.unit_resource != SHARED_RESOURCE or s.unit_kind == "shared",
        ),
    )
    # what the billing core requires (docs/billing.md): spot, packages and the model
    # price are optional ("not offered", or the pay-as-you-go price for models)
    product: str = Field(
        description="GPU product (nvidia.com/gpu.product label value).",
        pattern=GPU_PRODUCT_PATTERN,
        max_length=63,  # what the pattern allows; bounds the cost of the CEL rules
    )
    kind: Literal["whole", "mig", "shared"] | None = Field(
        default=None,
        description="What one unit is: a whole GPU, a MIG slice (product <GPU>-MIG-<profile>), "
        "or a time-sliced share of a GPU (one replica of the device plugin's sharing config). "
        "Prices are per unit. Omitted: whole.",
    )
    resource: str | None = Field(
        default=None,
        description=f"The extended resource an instance requests: {GPU_RESOURCE}, "
        f"{SHARED_RESOURCE} (time-slicing with renameByDefault) or "
        f"{MIG_RESOURCE_PREFIX}<profile> (MIG, mixed strategy). Omitted: {GPU_RESOURCE}.",
        pattern=RESOURCE_PATTERN,
        max_length=64,
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

    @property
    def unit_kind(self) -> str:
        return self.kind or "whole"

    @property
    def unit_resource(self) -> str:
        return self.resource or GPU_RESOURCE

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

    def prices(self) -> billing.PriceBook:
        """The billing core's price book: the same prices as exact Decimals."""
        return billing.PriceBook(
            currency=self.currency,
            gpus=tuple(_gpu(g) for g in self.gpus),
            storage=billing.StoragePrices(
                instance_per_gb_hour=Decimal(self.storage.instance_per_gb_hour),
                cloud_disk_per_gb_hour=Decimal(self.storage.cloud_disk_per_gb_hour),
                image_per_gb_hour=Decimal(self.storage.image_per_gb_hour),
            ),
            models=billing.ModelPrices(
                per_1k_tokens=Decimal(self.models.per_1k_tokens),
                per_image=Decimal(self.models.per_image),
                per_video=Decimal(self.models.per_video),
                personal_per_request_second=Decimal(self.models.personal_per_request_second),
            ),
        )


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _gpu(g: GPUPrice) -> billing.GPUPrice:
    p = g.packages
    packages = None if p is None else billing.GPUPackages(_dec(p.day), _dec(p.week), _dec(p.month))
    return billing.GPUPrice(
        product=g.product,
        kind=g.kind,
        resource=g.resource,
        pay_as_you_go_per_hour=Decimal(g.pay_as_you_go_per_hour),
        spot_per_hour=_dec(g.spot_per_hour),
        packages=packages,
        model_online_per_hour=_dec(g.model_online_per_hour),
    )


def read(doc: Any) -> PriceBookSpec:
    """A PriceBook resource (``kind``, ``spec``...) or its bare spec, through the model.
    PriceBookError names every field refused and the rule it breaks."""
    if not isinstance(doc, Mapping):
        raise PriceBookError(f"a PriceBook is a mapping, got {type(doc).__name__}")
    spec: Any = doc
    if "spec" in doc or "kind" in doc:  # a whole resource, not a bare spec
        if doc.get("kind", "PriceBook") != "PriceBook":
            raise PriceBookError(f"kind: expected PriceBook, got {doc.get('kind')!r}")
        if "spec" not in doc:
            raise PriceBookError("spec: required")
        spec = doc["spec"]
        if not isinstance(spec, Mapping):
            raise PriceBookError(f"spec: expected a mapping, got {type(spec).__name__}")
    try:
        return parse(PriceBookSpec, spec)
    except SpecError as exc:
        raise PriceBookError(f"invalid PriceBook: {exc}") from None


def price_book(doc: Any) -> billing.PriceBook:
    """What the billing core prices with, from a PriceBook resource or its spec."""
    return read(doc).prices()


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
