"""The usage records the agent builds and ships, as plain frozen dataclasses.

The wire format is ``gpucloud.usage.UsageRecord`` (pydantic), but pydantic alone costs
the agent 17 MiB of its memory (issue 20), so the agent keeps these instead: the same
fields, the same per-field rules (``gpucloud.usage_rules``, which the model reads too),
the same cross-field rule (``usage_rules.record_problem``) and the same JSON, key for
key (``to_json`` equals the model's ``model_dump(mode="json")``; a property test pins
it). A record that fails a rule raises ValueError naming the field and the rule.

These checks catch the agent's own mistakes early; they are not the trust boundary:
the metering API validates every record with the model again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gpucloud.usage_rules import (
    DEVICE_ID_PATTERN,
    MAX_GPU_WINDOW_S,
    MAX_NAME_LENGTH,
    MAX_POSIX_S,
    MAX_UID_LENGTH,
    MAX_VOLUME_BYTES,
    TEXT_PATTERN,
    UsageKind,
    record_problem,
)

# fullmatch: pydantic's patterns anchor ``$`` at the very end, where re.match's ``$``
# would also accept a trailing newline
_TEXT = re.compile(TEXT_PATTERN)
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def _text(field: str, value: object, max_length: int = MAX_NAME_LENGTH) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= max_length:
        raise ValueError(f"{field}: must be 1 to {max_length} characters, got {len(value)}")
    if _TEXT.fullmatch(value) is None:
        raise ValueError(f"{field}: must not contain control characters")


def _int(field: str, value: object, low: int, high: int) -> None:
    # exactly int: True is not 1 on the wire
    if type(value) is not int:
        raise ValueError(f"{field}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{field}: must be in {low}..{high}, got {value}")


@dataclass(frozen=True, slots=True)
class GPURef:
    uuid: str  # a GPU UUID, a MIG device UUID or a time-slicing replica (<GPU uuid>::<n>)
    product: str

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, str) or _DEVICE_ID.fullmatch(self.uuid) is None:
            raise ValueError(f"gpu.uuid: {self.uuid!r} must match {DEVICE_ID_PATTERN}")
        _text("gpu.product", self.product)

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "product": self.product}


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __post_init__(self) -> None:
        _text("pod.namespace", self.namespace)
        _text("pod.name", self.name)
        _text("pod.uid", self.uid, MAX_UID_LENGTH)

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid}


@dataclass(frozen=True, slots=True)
class Activity:
    """What a GPU did in a gpu_time window (gpucloud.usage.Activity): its busiest sampled
    second and how many seconds were sampled."""

    util_max_percent: int
    memory_max_bytes: int
    samples: int

    def __post_init__(self) -> None:
        _int("activity.util_max_percent", self.util_max_percent, 0, 100)
        _int("activity.memory_max_bytes", self.memory_max_bytes, 0, MAX_VOLUME_BYTES)
        _int("activity.samples", self.samples, 1, MAX_GPU_WINDOW_S)

    def to_json(self) -> dict[str, Any]:
        return {
            "util_max_percent": self.util_max_percent,
            "memory_max_bytes": self.memory_max_bytes,
            "samples": self.samples,
        }


@dataclass(frozen=True, slots=True)
class UsageRecord:
    kind: UsageKind
    node: str
    start: int  # POSIX seconds, inclusive
    end: int  # POSIX seconds, exclusive
    quantity: int  # GPU-seconds, or bytes used
    gpu: GPURef | None = None
    pod: PodRef | None = None
    volume: str | None = None
    activity: Activity | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, UsageKind):
            raise ValueError(f"kind: must be one of {', '.join(UsageKind)}, got {self.kind!r}")
        _text("node", self.node)
        _int("start", self.start, 0, MAX_POSIX_S)
        _int("end", self.end, 0, MAX_POSIX_S)
        _int("quantity", self.quantity, 0, MAX_VOLUME_BYTES)
        for name, cls in (("gpu", GPURef), ("pod", PodRef), ("activity", Activity)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ValueError(f"{name}: must be a {cls.__name__}, got {type(value).__name__}")
        if self.volume is not None:
            _text("volume", self.volume)
        problem = record_problem(self)
        if problem is not None:
            raise ValueError(problem)

    def to_json(self) -> dict[str, Any]:
        """The record as ``gpucloud.usage.UsageRecord.model_dump(mode="json")`` has it:
        every field, in the model's order, None included."""
        return {
            "kind": self.kind.value,
            "node": self.node,
            "start": self.start,
            "end": self.end,
            "quantity": self.quantity,
            "gpu": None if self.gpu is None else self.gpu.to_json(),
            "pod": None if self.pod is None else self.pod.to_json(),
            "volume": self.volume,
            "activity": None if self.activity is None else self.activity.to_json(),
        }
