"""The rules of a usage record, in the standard library only: the metering API's model
(``gpucloud.usage``, pydantic) and the node agent's plain records
(``gpucloud_agent.records``, which must not load pydantic: issue 20) both read them
from here, so the two cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

MAX_GPU_WINDOW_S = 10
HOUR_S = 3600
# Bounds that keep every stored integer inside 64 bits (issue 16): POSIX seconds up to
# the year 4147, at most 1 PiB per volume, volume windows of at most an hour (the agent
# reports hourly), so bytes x seconds < 2^62.
MAX_POSIX_S = 2**36
MAX_VOLUME_BYTES = 2**50
MAX_VOLUME_WINDOW_S = HOUR_S
MAX_NAME_LENGTH = 253  # a Kubernetes name, a node name, a volume id
MAX_UID_LENGTH = 64
# No control characters (PostgreSQL refuses NUL in text; none belongs in a name).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"

DEVICE_ID_PATTERN = r"^(GPU-[0-9A-Za-z-]{1,64}(::[0-9]{1,4})?|MIG-[0-9A-Za-z/-]{1,96})$"


class UsageKind(StrEnum):
    GPU_TIME = "gpu_time"  # quantity: GPU-seconds (= end - start for one GPU)
    INSTANCE_VOLUME = (
        "instance_volume"  # quantity: bytes used (instance storage is billed by quota)
    )
    CLOUD_DISK = "cloud_disk"  # quantity: bytes used, measured
    IMAGE = "image"  # quantity: bytes used, measured


class _Activity(Protocol):
    @property
    def samples(self) -> int: ...


class RecordFields(Protocol):
    """What ``record_problem`` reads of a record: both record classes have it."""

    @property
    def kind(self) -> UsageKind: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def quantity(self) -> int: ...
    @property
    def gpu(self) -> object | None: ...
    @property
    def pod(self) -> object | None: ...
    @property
    def volume(self) -> str | None: ...
    @property
    def activity(self) -> _Activity | None: ...


def record_problem(r: RecordFields) -> str | None:
    """What is wrong with a record whose fields are each valid, as a whole; None: nothing."""
    kind, start, end, quantity = r.kind, r.start, r.end, r.quantity
    if end <= start:
        return "end must be after start"
    if kind is UsageKind.GPU_TIME:
        if r.gpu is None or r.pod is None:
            return "gpu_time records need gpu and pod"
        if end - start > MAX_GPU_WINDOW_S:
            return f"gpu_time windows are at most {MAX_GPU_WINDOW_S} s"
        if quantity != end - start:
            return "gpu_time quantity must equal end - start (one GPU)"
        if r.activity is not None and r.activity.samples > quantity:
            return "activity.samples must not exceed the window's seconds"
    elif r.activity is not None:
        return f"{kind} records carry no activity (gpu_time only)"
    elif r.volume is None:
        return f"{kind} records need volume"
    elif end - start > MAX_VOLUME_WINDOW_S:
        return f"{kind} windows are at most {MAX_VOLUME_WINDOW_S} s"
    return None
