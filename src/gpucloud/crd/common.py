"""Pieces the CRDs share: exact decimal strings, names, conditions, GPU selectors."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from gpucloud.crd.k8s import DATE_TIME, INT64, Cel, ListType, Spec, immutable

DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$"
# DNS-1123 label, the rule for namespace and object names we reference.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# GPU Feature Discovery writes the product name with spaces replaced by dashes.
GPU_PRODUCT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Exactly the currencies the billing core rounds (gpucloud.billing.money's
# CURRENCY_EXPONENTS; a test keeps the two equal): any other is refused at admission.
Currency = Literal["CNY", "EUR", "JPY", "USD"]


def _quoted(value: Any) -> Any:
    """A number where a decimal string belongs: say to quote it (the API server refuses
    it as "must be of type string", which does not say why)."""
    if isinstance(value, bool):
        raise PydanticCustomError(
            "decimal_string", "a decimal must be a quoted string, not a boolean"
        )
    if isinstance(value, float):
        raise PydanticCustomError(
            "decimal_string",
            '{value} is a YAML/JSON float, which is inexact: quote it, e.g. "{value}"',
            {"value": repr(value)},
        )
    if isinstance(value, int):
        raise PydanticCustomError(
            "decimal_string",
            'a decimal is written as a string: quote it, e.g. "{value}"',
            {"value": str(value)},
        )
    return value


# Money is an exact decimal string, never a YAML float.
DecimalStr = Annotated[str, BeforeValidator(_quoted), Field(pattern=DECIMAL_PATTERN, max_length=20)]
POSITIVE = Cel("double(self) > 0.0", "must be greater than zero", check=lambda v: Decimal(v) > 0)
PositiveDecimal = Annotated[DecimalStr, POSITIVE]
# the finest minor unit of the supported currencies (a fen, a cent); the operator
# refuses amounts finer than the account currency's own (JPY: 0)
MINOR_UNIT = Cel(
    "self.matches('^[0-9]+([.][0-9]{1,2})?$')",
    "must not be finer than the currency's minor unit: at most 2 decimal places "
    "(0.01 CNY); amounts are never rounded",
    check=lambda v: re.match(r"^[0-9]+([.][0-9]{1,2})?$", v) is not None,
)
Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
Timestamp = Annotated[str, DATE_TIME]
Int64 = Annotated[int, INT64]


def money(desc: str) -> str:
    return desc + ' An exact decimal string such as "9.80".'


def optional(desc: str) -> Any:
    """An optional status field: absent until the operator writes it."""
    return Field(default=None, description=desc)


CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)


class Condition(Spec):
    type: str = Field(
        description="Condition type, e.g. Ready.", max_length=316, pattern=CONDITION_TYPE
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: Annotated[Int64 | None, Field(ge=0)] = None
    last_transition_time: Timestamp = Field(description="When the status last changed.")
    reason: str = Field(
        description="CamelCase reason.",
        max_length=1024,
        min_length=1,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(description="Human-readable detail.", max_length=32768)


class StatusBase(Spec):
    """Every status starts with these two; a kind's status adds its own fields."""

    observed_generation: Annotated[Int64 | None, Field(ge=0)] = None
    conditions: Annotated[list[Condition] | None, ListType("map", ("type",))] = Field(
        default=None, description="Conditions in the Kubernetes style, one per type."
    )


class GPUSelector(Spec):
    """Which GPUs and how many; the count's bounds and wording differ per kind, so each
    kind subclasses it (``selector``)."""

    product: Annotated[str, immutable("gpu.product")] = Field(
        description="GPU product as GPU Feature Discovery labels it "
        "(nvidia.com/gpu.product), e.g. NVIDIA-A100-SXM4-80GB.",
        pattern=GPU_PRODUCT_PATTERN,
    )
    count: int = 1
