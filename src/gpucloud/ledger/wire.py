"""The fast path for usage batches that arrive as JSON: parse and check them straight
into plain dicts, without building three pydantic models per record.

``parse_batch(raw)`` returns a ``WireBatch`` only when every record is certainly a valid
``gpucloud.usage.UsageRecord``: the per-field rules are the very same annotated types,
checked by pydantic-core in strict mode, and the cross-field rules of
``UsageRecord._check`` are repeated below. Anything else (an invalid record, a lax
coercion such as ``"10"`` for 10, an unknown field) returns None, and the caller takes
the slow path through ``UsageRecord``, which reports every error exactly. So the fast
path may refuse more than the model does, never less; a test pins that the rows it
yields equal the model's rows (``tests/ledger/test_wire.py``).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from gpucloud.usage import (
    MAX_GPU_WINDOW_S,
    MAX_VOLUME_WINDOW_S,
    Activity,
    GPURef,
    Name,
    PodRef,
    Quantity,
    Seconds,
    UsageKind,
    UsageRecord,
)

_GPU = UsageKind.GPU_TIME.value
_STRICT = ConfigDict(extra="forbid", strict=True)
Kind = Literal["gpu_time", "instance_volume", "cloud_disk", "image"]


@with_config(_STRICT)
class _Gpu(TypedDict):
    uuid: Annotated[str, *GPURef.model_fields["uuid"].metadata]
    product: Name


@with_config(_STRICT)
class _Pod(TypedDict):
    namespace: Name
    name: Name
    uid: Annotated[str, *PodRef.model_fields["uid"].metadata]


@with_config(_STRICT)
class _Activity(TypedDict):
    util_max_percent: Annotated[int, *Activity.model_fields["util_max_percent"].metadata]
    memory_max_bytes: Annotated[int, *Activity.model_fields["memory_max_bytes"].metadata]
    samples: Annotated[int, *Activity.model_fields["samples"].metadata]


@with_config(_STRICT)
class _Record(TypedDict):
    kind: Kind
    node: Name
    start: Seconds
    end: Seconds
    quantity: Quantity
    gpu: NotRequired[_Gpu | None]
    pod: NotRequired[_Pod | None]
    volume: NotRequired[Annotated[str | None, *UsageRecord.model_fields["volume"].metadata]]
    activity: NotRequired[_Activity | None]


@with_config(_STRICT)
class _Batch(TypedDict):
    records: Annotated[list[_Record], Field(max_length=10000)]


_adapter = TypeAdapter(_Batch)
_TOKEN = object()


def content_digest(content: tuple[object, ...]) -> str:
    """The ledger's fingerprint of a record's content (kind, node, start, end, quantity,
    subject, gpu product, pod namespace, pod name, pod uid, volume): the same natural key
    with another digest is a conflicting re-send. Stored: never change the formula."""
    return hashlib.blake2b(repr(content).encode(), digest_size=16).hexdigest()


def _digest(r: dict[str, Any]) -> str:
    gpu, pod, volume = r.get("gpu"), r.get("pod"), r.get("volume")
    content = (
        r["kind"], r["node"], r["start"], r["end"], r["quantity"],
        gpu["uuid"] if gpu is not None else str(volume),
        gpu["product"] if gpu is not None else None,
        pod["namespace"] if pod is not None else None,
        pod["name"] if pod is not None else None,
        pod["uid"] if pod is not None else None,
        volume,
    )  # fmt: skip
    return content_digest(content)


class WireBatch:
    """Records that passed ``parse_batch``: made only there, trusted by the ledger. The
    digests are computed here, before the caller waits for the ledger's write lock."""

    __slots__ = ("digests", "records")

    def __init__(self, records: list[dict[str, Any]], token: object) -> None:
        if token is not _TOKEN:
            raise TypeError("a WireBatch is made only by gpucloud.ledger.wire.parse_batch")
        self.records = records
        self.digests = [_digest(r) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, keep: list[int]) -> WireBatch:
        """The records at positions ``keep`` (their digests are not computed again)."""
        out = WireBatch([], _TOKEN)
        out.records = [self.records[i] for i in keep]
        out.digests = [self.digests[i] for i in keep]
        return out

    @property
    def nodes(self) -> list[str]:
        return [r["node"] for r in self.records]


def _valid(r: dict[str, Any]) -> bool:
    """UsageRecord._check, on a record whose fields are already valid."""
    start, end = r["start"], r["end"]
    if end <= start:
        return False
    activity = r.get("activity")
    if r["kind"] == _GPU:
        return (
            r.get("gpu") is not None
            and r.get("pod") is not None
            and end - start <= MAX_GPU_WINDOW_S
            and r["quantity"] == end - start
            and (activity is None or activity["samples"] <= r["quantity"])
        )
    return activity is None and r.get("volume") is not None and end - start <= MAX_VOLUME_WINDOW_S


def parse_batch(raw: bytes | str) -> WireBatch | None:
    """The batch ``{"records": [...]}`` if every record is certainly valid, else None."""
    try:
        records = _adapter.validate_json(raw)["records"]
    except ValidationError:
        return None
    for r in records:
        if not _valid(r):
            return None
    return WireBatch(records, _TOKEN)


# Fail loudly at import if the model grows a field this module does not know.
if set(_Record.__annotations__) != set(UsageRecord.model_fields):
    raise ImportError("gpucloud.ledger.wire does not cover every field of UsageRecord")
