"""The wire format of metered usage, shared by the node agent and the metering API.

A usage record says: this subject (one GPU, or one volume/disk/image) was held by
this pod or account for the whole-second interval [start, end) and the quantity is
so much. Times are integer POSIX seconds, so intervals are exact.

Natural key: (kind, subject, start). A GPU is held by at most one pod in any second,
so two records of the same GPU never overlap; a re-sent record with the same key
and the same content is a no-op, and one with the same key and other content is a
conflict.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The rules live in gpucloud.usage_rules (standard library only: the agent reads them
# without pydantic); the API side imports them from here as before.
from gpucloud.usage_rules import DEVICE_ID_PATTERN as DEVICE_ID_PATTERN
from gpucloud.usage_rules import HOUR_S as HOUR_S
from gpucloud.usage_rules import MAX_GPU_WINDOW_S as MAX_GPU_WINDOW_S
from gpucloud.usage_rules import MAX_NAME_LENGTH, MAX_UID_LENGTH, record_problem
from gpucloud.usage_rules import MAX_POSIX_S as MAX_POSIX_S
from gpucloud.usage_rules import MAX_VOLUME_BYTES as MAX_VOLUME_BYTES
from gpucloud.usage_rules import MAX_VOLUME_WINDOW_S as MAX_VOLUME_WINDOW_S
from gpucloud.usage_rules import TEXT_PATTERN as TEXT_PATTERN
from gpucloud.usage_rules import UsageKind as UsageKind

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=TEXT_PATTERN)]
Seconds = Annotated[int, Field(ge=0, le=MAX_POSIX_S)]
Quantity = Annotated[int, Field(ge=0, le=MAX_VOLUME_BYTES)]


class GPURef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # a GPU UUID, a MIG device UUID (``MIG-<uuid>``, or the older ``MIG-GPU-<uuid>/gi/ci``)
    # or a time-slicing replica (``GPU-<uuid>::<n>``): gpucloud.gpu_kinds.device_kind
    uuid: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    product: Name


class PodRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    namespace: Name
    name: Name
    uid: Annotated[str, Field(min_length=1, max_length=MAX_UID_LENGTH, pattern=TEXT_PATTERN)]


class Activity(BaseModel):
    """What a GPU did in a gpu_time window, from the agent's samples (idle-GPU detection,
    docs/idle.md): its busiest sampled second, and how many seconds were sampled (a
    window bridged over a gap in sampling has fewer samples than seconds, or none).
    Not billing data: it is kept beside the record, outside its content digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    util_max_percent: Annotated[int, Field(ge=0, le=100)]
    memory_max_bytes: Annotated[int, Field(ge=0, le=MAX_VOLUME_BYTES)]
    samples: Annotated[int, Field(ge=1, le=MAX_GPU_WINDOW_S)]


class UsageRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: UsageKind
    node: Name
    start: Annotated[Seconds, Field(description="POSIX seconds, inclusive")]
    end: Annotated[Seconds, Field(description="POSIX seconds, exclusive")]
    quantity: Annotated[Quantity, Field(description="GPU-seconds, or bytes used")]
    gpu: GPURef | None = None
    pod: PodRef | None = None
    volume: Annotated[
        str | None,
        Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH, pattern=TEXT_PATTERN),
    ] = None
    activity: Activity | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        problem = record_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def subject(self) -> str:
        """What was held: a GPU UUID or a volume id."""
        return self.gpu.uuid if self.gpu is not None else str(self.volume)

    @property
    def natural_key(self) -> str:
        return f"{self.kind}:{self.subject}:{self.start}"


class UsageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: Annotated[list[UsageRecord], Field(max_length=10000)]
