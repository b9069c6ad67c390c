"""``gpucloud estimate``: what a GPUInstance manifest costs and how long a balance lasts.

Pure: a manifest and a PriceBook in, exact numbers out (the rendering is in main)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from gpucloud.billing.errors import NotOffered
from gpucloud.billing.modes import HOUR_S, BillingMode, PackagePeriod
from gpucloud.billing.money import minor_exponent, to_decimal
from gpucloud.billing.packages import package_price_exact
from gpucloud.billing.pricebook import PriceBook
from gpucloud.billing.rating import gpu_hourly_exact
from gpucloud.gpu_kinds import shared_count_refusal

MODES = {
    "PayAsYouGo": BillingMode.PAY_AS_YOU_GO,
    "Spot": BillingMode.SPOT,
    "Package": BillingMode.PACKAGE,
}
MODE_NAMES = {v: k for k, v in MODES.items()}
PERIODS = {"Day": PackagePeriod.DAY, "Week": PackagePeriod.WEEK, "Month": PackagePeriod.MONTH}


class ManifestError(ValueError):
    """A manifest field that breaks a rule; the message names the field."""


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    product: str
    gpus: int
    mode: BillingMode
    period: PackagePeriod | None
    auto_renew: bool
    quota_gib: int


def parse_manifest(doc: Any) -> InstanceSpec:
    if not isinstance(doc, dict) or doc.get("kind") != "GPUInstance":
        raise ManifestError("kind: expected a GPUInstance manifest")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ManifestError("spec: required mapping")
    gpu = spec.get("gpu") or {}
    product, count = gpu.get("product"), gpu.get("count", 1)
    if not isinstance(product, str) or not product:
        raise ManifestError("spec.gpu.product: required string")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ManifestError("spec.gpu.count: must be an integer >= 1")
    billing = spec.get("billing") or {}
    mode_name = billing.get("mode", "PayAsYouGo")
    if mode_name not in MODES:
        raise ManifestError(f"spec.billing.mode: must be one of {', '.join(MODES)}")
    mode = MODES[mode_name]
    period = None
    if mode is BillingMode.PACKAGE:
        period_name = billing.get("period")
        if period_name not in PERIODS:
            raise ManifestError(
                f"spec.billing.period: required for Package, one of {', '.join(PERIODS)}"
            )
        period = PERIODS[period_name]
    quota = (spec.get("storage") or {}).get("quotaGi", 0)
    if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
        raise ManifestError("spec.storage.quotaGi: must be an integer >= 0")
    return InstanceSpec(
        name=str((doc.get("metadata") or {}).get("name", "")),
        product=product,
        gpus=count,
        mode=mode,
        period=period,
        auto_renew=bool(billing.get("autoRenew", False)),
        quota_gib=quota,
    )


# what one unit of a product is, in the estimate's words (gpucloud.gpu_kinds.GPUKind)
UNITS = {"whole": "GPUs", "mig": "MIG slices", "shared": "time-sliced shares"}


@dataclass(frozen=True)
class Estimate:
    spec: InstanceSpec
    currency: str
    kind: str  # whole, mig or shared
    resource: str  # what the instance's pod requests
    payg_gpu_per_hour: Decimal
    spot_gpu_per_hour: Decimal | None
    storage_per_hour: Decimal
    packages: dict[PackagePeriod, Decimal]  # upfront price of one term (storage included)
    selected_per_hour: Decimal | None  # metered modes: GPUs + storage per hour
    selected_package: Decimal | None
    balance_minor: int | None
    lasts_seconds: int | None  # metered modes: how long the balance pays for this instance
    terms_covered: int | None  # package mode: whole terms the balance pays for


def estimate(spec: InstanceSpec, pb: PriceBook, balance_minor: int | None = None) -> Estimate:
    gpu_price = pb.gpu_price(spec.product)  # UnknownProduct names the known ones
    # the operator's rule too (SharedGPUCount): one replica per instance
    if why := shared_count_refusal(spec.product, gpu_price.unit_kind, spec.gpus, "an instance"):
        raise ManifestError(why)
    payg = gpu_hourly_exact(pb, spec.product, spec.gpus, BillingMode.PAY_AS_YOU_GO)
    spot = None
    if gpu_price.spot_per_hour is not None:
        spot = gpu_hourly_exact(pb, spec.product, spec.gpus, BillingMode.SPOT)
    storage = Fraction(pb.storage.instance_per_gb_hour) * spec.quota_gib
    packages: dict[PackagePeriod, Fraction] = {}
    for period in PackagePeriod:
        with contextlib.suppress(NotOffered):  # a period left out is simply not offered
            packages[period] = package_price_exact(pb, spec.product, period, spec.gpus)
    per_hour = package = None
    lasts = terms = None
    if spec.mode is BillingMode.PACKAGE:
        assert spec.period is not None
        if spec.period not in packages:
            raise NotOffered(f"a {spec.period} package is not offered for {spec.product!r}")
        package = packages[spec.period]
        if balance_minor is not None:
            balance = Fraction(balance_minor, 10 ** minor_exponent(pb.currency))
            terms = max(0, math.floor(balance / package)) if package else None
    else:
        gpu_hour = payg if spec.mode is BillingMode.PAY_AS_YOU_GO else spot
        if gpu_hour is None:
            raise NotOffered(f"spot is not offered for {spec.product!r}")
        per_hour = gpu_hour + storage
        if balance_minor is not None and per_hour > 0:
            balance = Fraction(balance_minor, 10 ** minor_exponent(pb.currency))
            lasts = max(0, math.floor(balance / per_hour * HOUR_S))
    return Estimate(
        spec=spec,
        currency=pb.currency,
        kind=gpu_price.unit_kind,
        resource=gpu_price.unit_resource,
        payg_gpu_per_hour=to_decimal(payg),
        spot_gpu_per_hour=None if spot is None else to_decimal(spot),
        storage_per_hour=to_decimal(storage),
        packages={p: to_decimal(v) for p, v in packages.items()},
        selected_per_hour=None if per_hour is None else to_decimal(per_hour),
        selected_package=None if package is None else to_decimal(package),
        balance_minor=balance_minor,
        lasts_seconds=lasts,
        terms_covered=terms,
    )


def human_duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days} d"] if days else []
    if hours or days:
        parts.append(f"{hours} h")
    parts.append(f"{minutes} min")
    return " ".join(parts)
