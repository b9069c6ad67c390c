"""The PriceBook custom resource's ``spec``, validated.

Decimals are written as strings in YAML ("9.80"): a YAML float such as ``9.8`` is a
binary float, and is refused with a message telling the admin to quote it. Field names
are camelCase in YAML (aliases) and snake_case in Python.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from gpucloud.billing.errors import NotOffered, PriceBookError, PriceError, UnknownProduct
from gpucloud.billing.modes import BillingMode, PackagePeriod
from gpucloud.billing.money import (
    CURRENCY_EXPONENTS,
    DEFAULT_CURRENCY,
    MAX_PRICE_PLACES,
    parse_price,
)


def _price(value: Any) -> Decimal:
    if isinstance(value, float):
        raise ValueError(
            f'{value!r} is a YAML/JSON float, which is inexact: quote it, e.g. "{value}"'
        )
    if isinstance(value, bool):
        raise ValueError("a price must be a quoted decimal string, not a boolean")
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError(f"{value} is not a non-negative finite decimal")
        if -value.as_tuple().exponent > MAX_PRICE_PLACES:  # type: ignore[operator]
            raise ValueError(f"{value} has more than {MAX_PRICE_PLACES} decimal places")
        return value
    try:
        return parse_price(value, "value")
    except PriceError as exc:
        raise ValueError(str(exc).removeprefix("value: ")) from None


Price = Annotated[
    Decimal,
    BeforeValidator(_price),
    PlainSerializer(lambda d: str(d), return_type=str, when_used="json-unless-none"),
]
"""A non-negative exact decimal price with at most 6 places, written as a string."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GPUPackages(_Spec):
    """Prepaid package prices, per GPU, per period. A period left out is not offered."""

    day: Price | None = None
    week: Price | None = None
    month: Price | None = None


class GPUPrice(_Spec):
    """Prices of one GPU product (its GPU Feature Discovery ``nvidia.com/gpu.product``)."""

    product: Annotated[str, Field(min_length=1, max_length=253)]
    pay_as_you_go_per_hour: Annotated[Price, Field(alias="payAsYouGoPerHour")]
    spot_per_hour: Annotated[Price | None, Field(alias="spotPerHour")] = None
    packages: GPUPackages | None = None
    model_online_per_hour: Annotated[Price | None, Field(alias="modelOnlinePerHour")] = None

    @model_validator(mode="after")
    def _spot_not_dearer(self) -> Self:
        if self.spot_per_hour is not None and self.spot_per_hour > self.pay_as_you_go_per_hour:
            raise ValueError(
                f"spotPerHour ({self.spot_per_hour}) must be <= payAsYouGoPerHour "
                f"({self.pay_as_you_go_per_hour}) for product {self.product!r}"
            )
        return self

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


class StoragePrices(_Spec):
    """Per GB-hour (GB = GiB = 2**30 bytes)."""

    instance_per_gb_hour: Annotated[Price, Field(alias="instancePerGBHour")]
    cloud_disk_per_gb_hour: Annotated[Price, Field(alias="cloudDiskPerGBHour")]
    image_per_gb_hour: Annotated[Price, Field(alias="imagePerGBHour")]


class ModelPrices(_Spec):
    per_1k_tokens: Annotated[Price, Field(alias="per1KTokens")]
    per_image: Annotated[Price, Field(alias="perImage")]
    per_video: Annotated[Price, Field(alias="perVideo")]
    personal_per_request_second: Annotated[Price, Field(alias="personalPerRequestSecond")]


class PriceBook(_Spec):
    currency: str = DEFAULT_CURRENCY
    gpus: Annotated[list[GPUPrice], Field(min_length=1)]
    storage: StoragePrices
    models: ModelPrices

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        # validated on the field, so the error names spec.currency
        if value not in CURRENCY_EXPONENTS:
            known = ", ".join(sorted(CURRENCY_EXPONENTS))
            raise ValueError(f"{value!r} is not a currency the billing core rounds ({known})")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        seen: set[str] = set()
        for gpu in self.gpus:
            if gpu.product in seen:
                raise ValueError(f"GPU product {gpu.product!r} is listed twice in gpus")
            seen.add(gpu.product)
        return self

    @property
    def products(self) -> list[str]:
        return [gpu.product for gpu in self.gpus]

    def gpu_price(self, product: str) -> GPUPrice:
        """The prices of a GPU product; UnknownProduct names it and the known products."""
        for gpu in self.gpus:
            if gpu.product == product:
                return gpu
        raise UnknownProduct(product, self.products)

    @classmethod
    def from_spec(cls, spec: Any, where: str = "spec") -> PriceBook:
        """Validate a spec mapping; every problem is reported as ``spec.path: message``."""
        if not isinstance(spec, dict):
            raise PriceBookError(f"{where}: expected a mapping, got {type(spec).__name__}")
        try:
            return cls.model_validate(spec)
        except ValidationError as exc:
            raise PriceBookError(_describe(exc, where)) from None

    @classmethod
    def from_resource(cls, obj: dict[str, Any]) -> PriceBook:
        """From a whole PriceBook custom resource (``apiVersion``, ``kind``, ``spec``...)."""
        if not isinstance(obj, dict):
            raise PriceBookError(f"a PriceBook resource is a mapping, got {type(obj).__name__}")
        kind = obj.get("kind", "PriceBook")
        if kind != "PriceBook":
            raise PriceBookError(f"kind: expected PriceBook, got {kind!r}")
        if "spec" not in obj:
            raise PriceBookError("spec: required")
        return cls.from_spec(obj["spec"])

    def to_spec(self) -> dict[str, Any]:
        """The spec as it is written in YAML: camelCase keys, decimals as strings."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _describe(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        path = where
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}")
    return "invalid PriceBook: " + "; ".join(lines)
