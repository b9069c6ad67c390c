"""Model charge rules: which rule bills a model, and the exact charge of a request or of
replica online time. Pure, no I/O, ``now`` passed in.

Which rule applies (the seed's "Model Billing"):

* official public model: per token (TextGeneration), generated image (ImageGeneration)
  or generated video (VideoGeneration), for each successful request;
* personal public model: the runtime of each successful request only;
* private model / deployment: replicas x online time (start-up, requests, idle), nothing
  while cold.

The amounts here are exact; rounding and posting are the ledger's
(``gpucloud.ledger.model_billing``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from gpucloud.billing.errors import BillingError
from gpucloud.billing.pricebook import PriceBook
from gpucloud.billing.rating import (
    model_online_charge,
    official_model_charge,
    personal_model_charge,
)


class ModelBillingError(BillingError):
    """Bad model billing input, naming the field and the rule."""


class Rule(StrEnum):
    OFFICIAL = "official"  # per token / image / video
    PERSONAL = "personal"  # per second of request runtime
    ONLINE = "online"  # replicas x online time


@dataclass(frozen=True)
class ModelPlan:
    """What billing needs to know about one model."""

    namespace: str
    name: str
    account: str  # the owner: pays online time; pays per-use calls without a caller account
    visibility: str = "Private"  # Private | Public
    publisher: str | None = None  # Official | Personal (public models)
    task: str | None = None  # TextGeneration | ImageGeneration | VideoGeneration
    product: str = ""  # GPU product of a replica
    gpus_per_replica: int = 1

    def __post_init__(self) -> None:
        if self.visibility not in ("Private", "Public"):
            raise ModelBillingError(
                f"visibility: must be Private or Public, got {self.visibility!r}"
            )
        if self.visibility == "Public":
            if self.publisher not in ("Official", "Personal"):
                raise ModelBillingError(
                    f"pricing.publisher: must be Official or Personal for a public model, "
                    f"got {self.publisher!r}"
                )
            if self.publisher == "Official" and self.task not in (
                "TextGeneration",
                "ImageGeneration",
                "VideoGeneration",
            ):
                raise ModelBillingError(
                    f"pricing.task: required for an official model "
                    f"(TextGeneration|ImageGeneration|VideoGeneration), got {self.task!r}"
                )
        if isinstance(self.gpus_per_replica, bool) or not isinstance(self.gpus_per_replica, int):
            raise ModelBillingError("gpu.count: must be an int")
        if self.gpus_per_replica < 1:
            raise ModelBillingError(f"gpu.count: must be >= 1, got {self.gpus_per_replica}")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def rule(self) -> Rule:
        if self.visibility == "Private":
            return Rule.ONLINE
        return Rule.OFFICIAL if self.publisher == "Official" else Rule.PERSONAL

    @property
    def resource(self) -> str:
        """The ledger resource its charges are posted against."""
        return f"model/{self.key}"

    @classmethod
    def from_resource(cls, md: Mapping[str, Any], account: str) -> ModelPlan:
        """From a ModelDeployment custom resource and its owner's account."""
        meta, spec = md["metadata"], md["spec"]
        pricing = spec.get("pricing") or {}
        gpu = spec.get("gpu") or {}
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            account=account,
            visibility=spec.get("visibility", "Private"),
            publisher=pricing.get("publisher"),
            task=pricing.get("task"),
            product=gpu.get("product", ""),
            gpus_per_replica=gpu.get("count", 1),
        )


@dataclass(frozen=True)
class UsageEvent:
    """One request through the gateway: the unit of request metering and billing."""

    request_id: str
    namespace: str
    model: str
    at: datetime  # when the request arrived
    runtime_ms: int  # from forwarding it to the last byte of the response
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    videos: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300


def request_charge(pb: PriceBook, plan: ModelPlan, event: UsageEvent) -> Decimal | None:
    """The exact charge of one request, or None when requests are not billed one by one
    (private models: online time). Failed requests (non-2xx) cost nothing."""
    if plan.rule is Rule.ONLINE:
        return None
    if not event.succeeded:
        return Decimal(0)
    if plan.rule is Rule.PERSONAL:
        return personal_model_charge(pb, [event.runtime_ms])
    if plan.task == "ImageGeneration":
        return official_model_charge(pb, images=event.images)
    if plan.task == "VideoGeneration":
        return official_model_charge(pb, videos=event.videos)
    return official_model_charge(pb, tokens=event.tokens)


@dataclass(frozen=True)
class ReplicaInterval:
    replica: str
    start: datetime
    end: datetime | None = None  # None: still online


def online_seconds(intervals: Iterable[ReplicaInterval], now: datetime) -> list[int]:
    """Whole online seconds of each replica interval up to ``now`` (start-up, requests and
    idle all count; an interval that has not begun counts 0)."""
    out = []
    for iv in intervals:
        end = now if iv.end is None else min(iv.end, now)
        out.append(max(0, int((end - iv.start).total_seconds())))
    return out


def online_charge(
    pb: PriceBook, plan: ModelPlan, intervals: Iterable[ReplicaInterval], now: datetime
) -> Decimal:
    """Exact online charge of a private model or deployment up to ``now``."""
    return model_online_charge(
        pb, plan.product, plan.gpus_per_replica, online_seconds(intervals, now)
    )
