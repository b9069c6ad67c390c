"""Rating: usage x price, exactly.

Every function returns the exact amount in major units as a ``Decimal`` (see
``money.to_decimal``); nothing here rounds to minor units. Callers post with
``to_minor`` (one-off charges) or ``next_posting`` (running meters). The ``*_exact``
twins return ``Fraction`` for callers that compose amounts further.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from gpucloud.billing.errors import BillingError, PriceError
from gpucloud.billing.intervals import US_PER_S, Instant, covered_us, interval_us
from gpucloud.billing.modes import HOUR_S, BillingMode, PackagePeriod
from gpucloud.billing.money import Exact, as_fraction, to_decimal
from gpucloud.billing.pricebook import PriceBook

GIB = 2**30  # "GB" in every storage price means GiB
US_PER_HOUR = HOUR_S * US_PER_S


def count(value: int, what: str, minimum: int = 0) -> int:
    """An integer quantity (never a float or bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BillingError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise BillingError(f"{what} must be >= {minimum}, got {value}")
    return value


def quantity(value: Exact, what: str) -> Fraction:
    """A non-negative exact quantity (a storage quota in GiB may be fractional)."""
    q = as_fraction(value, what)
    if q < 0:
        raise PriceError(f"{what} must be >= 0, got {value}")
    return q


# GPU time: pay-as-you-go and spot -------------------------------------------------------


def gpu_hourly_exact(pb: PriceBook, product: str, gpu_count: int, mode: BillingMode) -> Fraction:
    count(gpu_count, "gpu_count", 1)
    return Fraction(pb.gpu_price(product).hourly(mode)) * gpu_count


def gpu_cost_exact(
    pb: PriceBook,
    product: str,
    seconds: int,
    gpu_count: int = 1,
    mode: BillingMode = BillingMode.PAY_AS_YOU_GO,
) -> Fraction:
    count(seconds, "seconds")
    return gpu_hourly_exact(pb, product, gpu_count, mode) * seconds / HOUR_S


def gpu_cost(
    pb: PriceBook,
    product: str,
    seconds: int,
    gpu_count: int = 1,
    mode: BillingMode = BillingMode.PAY_AS_YOU_GO,
) -> Decimal:
    """Cost of ``seconds`` of an instance holding ``gpu_count`` GPUs of ``product``, at the
    pay-as-you-go or spot hourly price. For a meter of GPU-seconds (one usage record per
    GPU), pass the GPU-seconds as ``seconds`` and ``gpu_count=1``."""
    return to_decimal(gpu_cost_exact(pb, product, seconds, gpu_count, mode))


# Instance storage: by quota, every hour, except while a package covers it -------------------


def instance_storage_charge_exact(
    pb: PriceBook,
    quota_gib: Exact,
    window_start: Instant,
    window_end: Instant,
    package_terms: Iterable[tuple[Instant, Instant]] = (),
) -> Fraction:
    window = interval_us(window_start, window_end, "storage window")
    terms = [interval_us(a, b, "package term") for a, b in package_terms]
    billed_us = (window[1] - window[0]) - covered_us(window, terms)
    price = Fraction(pb.storage.instance_per_gb_hour)
    return price * quantity(quota_gib, "quota_gib") * billed_us / US_PER_HOUR


def instance_storage_charge(
    pb: PriceBook,
    quota_gib: Exact,
    window_start: Instant,
    window_end: Instant,
    package_terms: Iterable[tuple[Instant, Instant]] = (),
) -> Decimal:
    """Instance storage for the window [start, end) (normally one clock hour), billed by
    the quota whether the instance runs or not, except the part of the window inside any
    package term [start, expiry) (storage is included in the package price there)."""
    return to_decimal(
        instance_storage_charge_exact(pb, quota_gib, window_start, window_end, package_terms)
    )


# Cloud disks and images: measured bytes, per GB-hour ------------------------------------------


def _byte_seconds_charge(price: Decimal, byte_seconds: int) -> Fraction:
    count(byte_seconds, "byte_seconds")
    return Fraction(price) * byte_seconds / (GIB * HOUR_S)


def cloud_disk_charge(pb: PriceBook, byte_seconds: int) -> Decimal:
    """Cloud disk storage for sum(used_bytes x seconds) over its usage records."""
    return to_decimal(_byte_seconds_charge(pb.storage.cloud_disk_per_gb_hour, byte_seconds))


def image_charge(pb: PriceBook, byte_seconds: int) -> Decimal:
    """Image storage for sum(used_bytes x seconds) over its usage records."""
    return to_decimal(_byte_seconds_charge(pb.storage.image_per_gb_hour, byte_seconds))


# Models -----------------------------------------------------------------------------------


def official_model_charge(
    pb: PriceBook, *, tokens: int = 0, images: int = 0, videos: int = 0
) -> Decimal:
    """Official public models: per 1K tokens (pro rata, not rounded up to whole
    thousands), per generated image, per generated video."""
    m = pb.models
    total = (
        Fraction(m.per_1k_tokens) * count(tokens, "tokens") / 1000
        + Fraction(m.per_image) * count(images, "images")
        + Fraction(m.per_video) * count(videos, "videos")
    )
    return to_decimal(total)


def personal_model_charge(pb: PriceBook, request_runtimes_ms: Iterable[int]) -> Decimal:
    """Personal public models: only the runtime of each request, in milliseconds (never
    start-up or idle time), at personalPerRequestSecond."""
    total_ms = sum(count(ms, "request runtime (ms)") for ms in request_runtimes_ms)
    return to_decimal(Fraction(pb.models.personal_per_request_second) * total_ms / 1000)


def model_online_charge_exact(
    pb: PriceBook, product: str, gpus_per_replica: int, replica_online_seconds: Iterable[int]
) -> Fraction:
    count(gpus_per_replica, "gpus_per_replica", 1)
    seconds = sum(count(s, "replica online seconds") for s in replica_online_seconds)
    return Fraction(pb.gpu_price(product).online_per_hour) * gpus_per_replica * seconds / HOUR_S


def model_online_charge(
    pb: PriceBook, product: str, gpus_per_replica: int, replica_online_seconds: Iterable[int]
) -> Decimal:
    """Private models and model deployments: the online seconds of each replica (start-up,
    requests and idle; a cold replica is not online) x GPUs per replica x
    modelOnlinePerHour."""
    return to_decimal(
        model_online_charge_exact(pb, product, gpus_per_replica, replica_online_seconds)
    )


# Burn rate and estimates ------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the burn rate sees it."""

    product: str
    gpu_count: int
    mode: BillingMode
    running: bool
    storage_gib: Exact = 0
    package_active: bool = False  # inside a paid package term


@dataclass(frozen=True)
class ModelLoad:
    """A private model or deployment with ``replicas`` online now."""

    product: str
    gpus_per_replica: int
    replicas: int


def burn_rate_exact(
    pb: PriceBook,
    instances: Iterable[InstanceLoad] = (),
    *,
    cloud_disk_bytes: int = 0,
    image_bytes: int = 0,
    models: Iterable[ModelLoad] = (),
) -> Fraction:
    rate = Fraction(0)
    for inst in instances:
        if inst.running and inst.mode is not BillingMode.PACKAGE:
            rate += gpu_hourly_exact(pb, inst.product, inst.gpu_count, inst.mode)
        if not (inst.mode is BillingMode.PACKAGE and inst.package_active):
            rate += Fraction(pb.storage.instance_per_gb_hour) * quantity(
                inst.storage_gib, "storage_gib"
            )
    rate += (
        Fraction(pb.storage.cloud_disk_per_gb_hour)
        * count(cloud_disk_bytes, "cloud_disk_bytes")
        / GIB
    )
    rate += Fraction(pb.storage.image_per_gb_hour) * count(image_bytes, "image_bytes") / GIB
    for model in models:
        rate += model_online_charge_exact(
            pb, model.product, model.gpus_per_replica, [HOUR_S] * count(model.replicas, "replicas")
        )
    return rate


def burn_rate_per_hour(
    pb: PriceBook,
    instances: Iterable[InstanceLoad] = (),
    *,
    cloud_disk_bytes: int = 0,
    image_bytes: int = 0,
    models: Iterable[ModelLoad] = (),
) -> Decimal:
    """What the account spends per hour right now on time-based charges: metered GPUs of
    running pay-as-you-go/spot instances, instance storage outside package terms, cloud
    disks and images as last measured, and online private-model replicas. Prepaid package
    GPUs cost nothing per hour; per-request model charges are not predictable and are left
    out."""
    return to_decimal(
        burn_rate_exact(
            pb, instances, cloud_disk_bytes=cloud_disk_bytes, image_bytes=image_bytes, models=models
        )
    )


def hours_affordable(balance: Exact, burn_rate: Exact) -> Decimal | None:
    """How many hours ``balance`` lasts at ``burn_rate`` per hour; None when nothing burns
    (it lasts for ever); 0 when the balance is zero or negative."""
    rate = quantity(burn_rate, "burn_rate")
    bal = as_fraction(balance, "balance")
    if rate == 0:
        return None
    return to_decimal(max(bal, Fraction(0)) / rate)


@dataclass(frozen=True)
class Estimate:
    """Prices of one instance shape, for the CLI's ``estimate``."""

    currency: str
    product: str
    gpu_count: int
    storage_gib: Decimal
    pay_as_you_go_per_hour: Decimal  # GPUs only
    spot_per_hour: Decimal | None  # None: spot not offered
    storage_per_hour: Decimal  # the quota, outside package terms
    packages: dict[PackagePeriod, Decimal] = field(default_factory=dict)  # offered periods

    def hours_affordable(
        self, balance: Exact, mode: BillingMode = BillingMode.PAY_AS_YOU_GO
    ) -> Decimal | None:
        """How long ``balance`` runs this instance (GPUs and storage) in a metered mode."""
        gpu = self.spot_per_hour if mode is BillingMode.SPOT else self.pay_as_you_go_per_hour
        if gpu is None:
            raise BillingError(f"spot is not offered for {self.product!r}")
        return hours_affordable(balance, Fraction(gpu) + Fraction(self.storage_per_hour))


def estimate(pb: PriceBook, product: str, gpu_count: int = 1, storage_gib: Exact = 0) -> Estimate:
    gpu = pb.gpu_price(product)
    count(gpu_count, "gpu_count", 1)
    quota = quantity(storage_gib, "storage_gib")
    packages = {}
    for period in PackagePeriod:
        price = None if gpu.packages is None else getattr(gpu.packages, period.value)
        if price is not None:
            packages[period] = to_decimal(Fraction(price) * gpu_count)
    return Estimate(
        currency=pb.currency,
        product=product,
        gpu_count=gpu_count,
        storage_gib=to_decimal(quota),
        pay_as_you_go_per_hour=to_decimal(Fraction(gpu.pay_as_you_go_per_hour) * gpu_count),
        spot_per_hour=(
            None
            if gpu.spot_per_hour is None
            else to_decimal(Fraction(gpu.spot_per_hour) * gpu_count)
        ),
        storage_per_hour=to_decimal(Fraction(pb.storage.instance_per_gb_hour) * quota),
        packages=packages,
    )
