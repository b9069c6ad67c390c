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

from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_GPU_WINDOW_S = 10
HOUR_S = 3600
# Bounds that keep every stored integer inside 64 bits (issue 16): POSIX seconds up to
# the year 4147, at most 1 PiB per volume, volume windows of at most an hour (the agent
# reports hourly), so bytes x seconds < 2^62.
MAX_POSIX_S = 2**36
MAX_VOLUME_BYTES = 2**50
MAX_VOLUME_WINDOW_S = HOUR_S
# No control characters (PostgreSQL refuses NUL in text; none belongs in a name).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"

DEVICE_ID_PATTERN = r"^(GPU-[0-9A-Za-z-]{1,64}(::[0-9]{1,4})?|MIG-[0-9A-Za-z/-]{1,96})$"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=TEXT_PATTERN)]
Seconds = Annotated[int, Field(ge=0, le=MAX_POSIX_S)]
Quantity = Annotated[int, Field(ge=0, le=MAX_VOLUME_BYTES)]


class UsageKind(StrEnum):
    GPU_TIME = "gpu_time"  # quantity: GPU-seconds (= end - start for one GPU)
    INSTANCE_VOLUME = (
        "instance_volume"  # quantity: bytes used (instance storage is billed by quota)
    )
    CLOUD_DISK = "cloud_disk"  # quantity: bytes used, measured
    IMAGE = "image"  # quantity: bytes used, measured


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
    uid: Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)]


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
    volume: Annotated[str | None, Field(default=None, min_length=1, max_length=253,
                                        pattern=TEXT_PATTERN)] = None  # fmt: skip
    activity: Activity | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        if self.kind is UsageKind.GPU_TIME:
            if self.gpu is None or self.pod is None:
                raise ValueError("gpu_time records need gpu and pod")
            if self.end - self.start > MAX_GPU_WINDOW_S:
                raise ValueError(f"gpu_time windows are at most {MAX_GPU_WINDOW_S} s")
            if self.quantity != self.end - self.start:
                raise ValueError("gpu_time quantity must equal end - start (one GPU)")
            if self.activity is not None and self.activity.samples > self.quantity:
                raise ValueError("activity.samples must not exceed the window's seconds")
        elif self.activity is not None:
            raise ValueError(f"{self.kind} records carry no activity (gpu_time only)")
        elif self.volume is None:
            raise ValueError(f"{self.kind} records need volume")
        elif self.end - self.start > MAX_VOLUME_WINDOW_S:
            raise ValueError(f"{self.kind} windows are at most {MAX_VOLUME_WINDOW_S} s")
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
