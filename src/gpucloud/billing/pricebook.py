"""The prices the billing core rates with: exact ``Decimal``s, nothing parsed here.

The PriceBook resource's spec has one model, its CRD model
(``gpucloud.crd.pricebook.PriceBookSpec``): it validates the spec (the same rules the
API server applies) and builds this value in one function, ``PriceBookSpec.prices()``.
So the billing core stays plain data and arithmetic, and no price-book rule is written
twice. Field names are the spec's in snake_case.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from gpucloud.billing.errors import NotOffered, UnknownProduct
from gpucloud.billing.modes import BillingMode, PackagePeriod


@dataclass(frozen=True)
class GPUPackages:
    """Prepaid package prices, per GPU, per period. A period left out is not offered."""

    day: Decimal | None = None
    week: Decimal | None = None
    month: Decimal | None = None


@dataclass(frozen=True)
class GPUPrice:
    """Prices of one GPU product (its GPU Feature Discovery ``nvidia.com/gpu.product``),
    per unit of it: a whole GPU, a MIG slice or a time-sliced share (``kind``), requested
    as ``resource`` (gpucloud.gpu_kinds names them; the CRD model validates the pair)."""

    product: str
    pay_as_you_go_per_hour: Decimal
    spot_per_hour: Decimal | None = None
    packages: GPUPackages | None = None
    model_online_per_hour: Decimal | None = None
    # None: a whole GPU, nvidia.com/gpu (the spec's omitted fields)
    kind: str | None = None
    resource: str | None = None

    @property
    def unit_kind(self) -> str:
        """whole, mig or shared (gpucloud.gpu_kinds.GPUKind)."""
        return self.kind or "whole"

    @property
    def unit_resource(self) -> str:
        """The extended resource an instance of it requests."""
        return self.resource or "nvidia.com/gpu"

    def hourly(self, mode: BillingMode) -> Decimal:
        """The per-GPU hourly price of a metered mode (pay-as-you-go or spot)."""
        if mode is BillingMode.PAY_AS_YOU_GO:
            return self.pay_as_you_go_per_hour
        if mode is BillingMode.SPOT:
            if self.spot_per_hour is None:
                raise NotOffered(f"spot is not offered for GPU product {self.product!r}")
            return self.spot_per_hour
        raise NotOffered(f"{mode} is prepaid, not billed per hour; use package_price()")

    def package_price(self, period: PackagePeriod) -> Decimal:
        """The per-GPU price of one package term."""
        price = None if self.packages is None else getattr(self.packages, period.value)
        if price is None:
            raise NotOffered(f"a {period} package is not offered for GPU product {self.product!r}")
        return price

    @property
    def online_per_hour(self) -> Decimal:
        """Per GPU-hour online of a private model or deployment (pay-as-you-go if unset)."""
        if self.model_online_per_hour is None:
            return self.pay_as_you_go_per_hour
        return self.model_online_per_hour


@dataclass(frozen=True)
class StoragePrices:
    """Per GB-hour (GB = GiB = 2**30 bytes)."""

    instance_per_gb_hour: Decimal
    cloud_disk_per_gb_hour: Decimal
    image_per_gb_hour: Decimal


@dataclass(frozen=True)
class ModelPrices:
    per_1k_tokens: Decimal
    per_image: Decimal
    per_video: Decimal
    personal_per_request_second: Decimal


@dataclass(frozen=True)
class PriceBook:
    currency: str
    gpus: tuple[GPUPrice, ...]
    storage: StoragePrices
    models: ModelPrices

    @property
    def products(self) -> list[str]:
        return [gpu.product for gpu in self.gpus]

    def gpu_price(self, product: str) -> GPUPrice:
        """The prices of a GPU product; UnknownProduct names it and the known products."""
        for gpu in self.gpus:
            if gpu.product == product:
                return gpu
        raise UnknownProduct(product, self.products)
