"""Value objects the ledger returns. Immutable dataclasses, independent of SQLAlchemy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any


class EntryKind(StrEnum):
    """What an entry is. Sign rules: recharge and refund > 0, charge < 0, adjustment != 0."""

    RECHARGE = "recharge"
    CHARGE = "charge"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"


class MeterKind(StrEnum):
    """Which usage a meter rates; the same values as ``gpucloud.usage.UsageKind``."""

    GPU_TIME = "gpu_time"
    CLOUD_DISK = "cloud_disk"
    IMAGE = "image"
    INSTANCE_VOLUME = "instance_volume"


class MeterUnit(StrEnum):
    GPU_HOUR = "gpu_hour"  # unit_price per GPU-hour; quantity GPU-seconds
    GB_HOUR = "gb_hour"  # unit_price per GiB-hour; quantity byte-seconds


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    EXPIRED = "expired"


class VoucherStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    currency: str
    balance_minor: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Entry:
    """One posting. ``balance_after`` is the account balance right after it (statement)."""

    id: int
    account: str
    kind: EntryKind
    amount_minor: int
    key: str
    resource: str | None
    memo: str
    at: datetime
    meta: dict[str, Any]
    balance_after: int


@dataclass(frozen=True, slots=True)
class PostResult:
    entry: Entry
    created: bool  # False: the key was already posted with the same content (a replay)


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index in batch, reason)
    # index -> the rule a refused record broke: conflict, overlap, or what the reporting
    # node may not report (wrong_node, unbound_gpu, over_capacity; gpucloud.ledger.admission)
    rules: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Meter:
    meter_id: str
    account: str
    resource: str
    kind: MeterKind
    subject: str
    unit_price: Decimal
    unit: MeterUnit
    opened_at: datetime
    closed_at: datetime | None
    memo: str
    gpus: int
    quantity_rated: int  # GPU-seconds or byte-seconds rated so far (exact numerator)
    posted_minor: int  # charged so far, positive minor units (the fallback included)
    seq: int  # charge entries posted so far
    # Settlement (Ledger.settle_meter): once settled_at is set nothing more is charged.
    settled_at: datetime | None = None
    fallback_quantity: int = 0  # GPU-seconds billed from control-plane timestamps
    fallback_minor: int = 0  # what the fallback entry charged, positive minor units
    late_quantity: int = 0  # usage that arrived after settlement: stored, never charged
    late_records: int = 0
    # What it was opened for: usage is charged only from ``node``, for the GPUs in
    # ``gpu_uuids`` (at most ``gpus``, bound by the first reports), and for volumes up to
    # ``max_bytes``. None: not bound yet (bound by the first report) or no cap.
    node: str | None = None
    gpu_uuids: tuple[str, ...] = ()
    max_bytes: int | None = None
    gpu_product: str | None = None  # GPU meters: the product its devices must report


@dataclass(frozen=True, slots=True)
class GpuActivity:
    """One gpu_time record of a run as idle detection reads it (UsageRecord.activity)."""

    gpu: str  # GPU UUID
    start: int  # POSIX seconds
    end: int
    util_max_percent: int | None  # None: the agent sent no activity for the window
    memory_max_bytes: int | None
    samples: int | None


@dataclass(frozen=True, slots=True)
class UnratedUsage:
    id: int
    kind: str
    subject: str  # GPU UUID or volume id
    owner: str  # pod UID (gpu_time) or volume id: what a meter's subject matches
    start: int
    end: int
    rated_until: int  # seconds before this were rated (by a meter since closed)
    quantity: int
    node: str
    namespace: str | None
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Unposted:
    """What an account's GPU runs owe beyond their postings (``Ledger.unposted``)."""

    open_minor: int  # accrued by open meters (running instances)
    closed_minor: int  # owed by closed, not yet settled meters (stopped runs in grace)

    @property
    def total_minor(self) -> int:
        return self.open_minor + self.closed_minor

    @staticmethod
    def summed(parts: Iterable[Unposted]) -> Unposted:
        """Parts (e.g. ``Ledger.unposted_by_resource``'s values) added up."""
        parts = list(parts)
        return Unposted(sum(u.open_minor for u in parts), sum(u.closed_minor for u in parts))


@dataclass(frozen=True, slots=True)
class UsageSummaryRow:
    resource: str | None  # None: usage no meter has rated (yet)
    kind: str
    gpu_seconds: int
    byte_seconds: int
    records: int


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    account: str
    amount_minor: int
    provider: str
    status: OrderStatus
    created_at: datetime
    expires_at: datetime
    provider_txn: str | None
    paid_at: datetime | None
    entry_id: int | None
    client_ref: str | None = None  # the client's idempotency key, unique per account


@dataclass(frozen=True, slots=True)
class Voucher:
    voucher_id: str
    account: str
    amount_minor: int
    payer: str
    bank: str
    transfer_no: str
    file_sha256: str | None
    status: VoucherStatus
    submitted_at: datetime
    reviewer: str | None
    reason: str | None
    reviewed_at: datetime | None
    entry_id: int | None
    submitter: str | None = None  # who submitted it (never its reviewer)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    account: str | None
    at: datetime
    actor: str
    action: str  # e.g. order.created, order.settled, voucher.approved, entry.posted
    subject: str  # the order id, voucher id or entry key
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NodeWipe:
    """A folder the agent of ``node`` must remove (``path`` relative to its data root)."""

    id: int
    node: str
    path: str
    subject: str  # what it wipes, unique (e.g. instance-volume:<uid>:<run>)
    account: str
    requested_at: datetime
    done_at: datetime | None  # None: pending
    bytes_freed: int | None


@dataclass(frozen=True, slots=True)
class ImageCopy:
    """A copy the agent of ``node`` must make: ``source`` (an instance folder) into
    ``path`` (an image folder), both relative to its data root."""

    id: int
    node: str
    source: str
    path: str
    subject: str  # what it copies, unique (image:<uid>)
    account: str
    requested_at: datetime
    done_at: datetime | None  # None: pending
    outcome: str | None  # None pending; "copied", "failed", "cancelled"
    bytes_used: int | None  # measured by the agent once copied
    message: str | None  # why it failed or was cancelled
