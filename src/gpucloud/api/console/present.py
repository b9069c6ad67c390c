"""What the console shows, as text: pure functions of what the ledger and the operator
recorded (``now`` passed in). Amounts are the ledger's minor units with the currency's
places (``format_money``), never re-rounded; the runway is the billing core's
``hours_affordable`` of the available balance at the burn rate the operator published
(``Account.status.costPerHour``); the retention countdown runs to the operator's
``status.dataDeletionAt``. No rule is decided here."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from gpucloud.billing import from_minor, hours_affordable
from gpucloud.billing.money import format_money, format_price

Obj = Mapping[str, Any]

_MODES = {"PayAsYouGo": "pay-as-you-go", "Spot": "spot", "Package": "package"}
_TASKS = {
    "TextGeneration": "per token",
    "ImageGeneration": "per image",
    "VideoGeneration": "per video",
}


def duration_text(seconds: int) -> str:
    """A rough length for people: "6 h 20 min", "3 d 4 h", "45 min", "5 y 299 d"."""
    if seconds < 60:
        return "less than a minute"
    minutes = seconds // 60
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days >= 365:
        return f"{days // 365} y {days % 365} d"
    if days >= 2:
        return f"{days} d {hours} h" if hours else f"{days} d"
    hours += days * 24
    if hours == 0:
        return f"{mins} min"
    return f"{hours} h {mins} min" if mins else f"{hours} h"


def parse_rate(text: object) -> Decimal | None:
    """``status.costPerHour`` as a Decimal; None when absent or not a plain decimal."""
    if not isinstance(text, str):
        return None
    try:
        rate = Decimal(text)
    except InvalidOperation:
        return None
    return rate if rate.is_finite() and rate >= 0 else None


def runway_text(available_minor: int, currency: str, cost_per_hour: object) -> str:
    """How long the available balance lasts at the account's current burn rate."""
    rate = parse_rate(cost_per_hour)
    if rate is None:
        return "unknown: the operator has not published this account's hourly cost yet"
    hours = hours_affordable(from_minor(max(available_minor, 0), currency), rate)
    if hours is None:
        return "nothing is billed by the hour now"
    per_hour = format_price(rate, currency)
    if hours <= 0:
        return f"nothing left at the current rate ({per_hour} per hour)"
    seconds = int(hours * 3600)
    return f"lasts about {duration_text(seconds)} at the current rate ({per_hour} per hour)"


def parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def when_text(at: datetime | None) -> str:
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M UTC")


def retention_text(status: Obj, now: datetime) -> str:
    """The arrears countdown: when data is deleted unless the debt is cleared."""
    if status.get("state") != "Arrears":
        return ""
    due = parse_time(status.get("dataDeletionAt"))
    if due is None:
        return "in arrears: data deletion is being scheduled"
    left = int((due - now).total_seconds())
    if left <= 0:
        return f"data deletion was due at {when_text(due)}"
    return (
        f"data is deleted in {duration_text(left)} (at {when_text(due)}) unless the debt is cleared"
    )


def state_text(status: Obj) -> str:
    state = status.get("state")
    since = parse_time(status.get("arrearsSince"))
    if state == "Arrears" and since is not None:
        return f"Arrears since {when_text(since)}: instances are shut down"
    return {
        "Active": "Active",
        "LowBalance": "Low balance: recharge soon",
        "Arrears": "Arrears: instances are shut down",
    }.get(str(state), "unknown: the operator has not assessed this account yet")


def mode_text(key: object) -> str:
    """ "PayAsYouGo" -> "pay-as-you-go", "Package/Month" -> "package (month)"."""
    if not isinstance(key, str) or not key:
        return ""
    mode, _, period = key.partition("/")
    text = _MODES.get(mode, mode)
    return f"{text} ({period.lower()})" if period else text


def _billing_key(spec: Obj) -> str:
    billing = spec.get("billing") or {}
    mode = str(billing.get("mode", "PayAsYouGo"))
    return f"Package/{billing.get('period')}" if mode == "Package" else mode


def _gpus(gpu: object) -> str:
    gpu = gpu if isinstance(gpu, Mapping) else {}
    return f"{gpu.get('count', 1)} × {gpu.get('product', '?')}"


def instance_row(obj: Obj, costs: Mapping[str | None, int], currency: str) -> dict[str, str]:
    """A GPUInstance as a table row; cost so far is what the ledger charged its
    resource (``namespace/name``) net of refunds."""
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    resource = f"{meta['namespace']}/{meta['name']}"
    return {
        "name": resource,
        "state": str(st.get("phase") or "Pending"),
        "gpus": _gpus(spec.get("gpu")),
        "mode": mode_text(st.get("billingMode") or _billing_key(spec)),
        "cost": format_money(costs.get(resource, 0), currency),
    }


def model_cost(costs: Mapping[str | None, int], namespace: str, name: str) -> int:
    """A model's charges: its requests (``model/ns/name``) and online time (``#online``)."""
    resource = f"model/{namespace}/{name}"
    return costs.get(resource, 0) + costs.get(f"{resource}#online", 0)


def model_mode(spec: Obj) -> str:
    if spec.get("visibility", "Private") == "Private":
        return "private: online time"
    pricing = spec.get("pricing") or {}
    if pricing.get("publisher") == "Official":
        return f"public: {_TASKS.get(str(pricing.get('task')), 'per use')}"
    return "public: per second of request runtime"


def model_row(obj: Obj, costs: Mapping[str | None, int], currency: str) -> dict[str, str]:
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ready, wanted = st.get("readyReplicas") or 0, st.get("replicas") or 0
    return {
        "name": f"{meta['namespace']}/{meta['name']}",
        "state": str(st.get("state") or "Pending"),
        "gpus": f"{ready}/{wanted} replicas of {_gpus(spec.get('gpu'))}",
        "mode": model_mode(spec),
        "cost": format_money(model_cost(costs, meta["namespace"], meta["name"]), currency),
    }
