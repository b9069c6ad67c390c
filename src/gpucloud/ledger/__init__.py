"""The ledger: the durable record of money and usage (SQLAlchemy; SQLite or PostgreSQL).

Money is integer minor units (fen for CNY). Every entry is append-only and carries a
unique idempotency key, so any posting may be replayed safely. Usage records are
ingested idempotently on their natural key; meters turn usage of a subject (a pod's
GPUs, a volume) into charge entries, posting the delta of the rounded cumulative total
in the same transaction that marks the usage rated. ``Ledger`` (ledger.py) is a facade
over one part per aggregate (accounts, entries, usage, meters, accrual, orders,
vouchers, audit, wipes, image copies, model billing); its docstring states the
transaction, idempotency and locking rules once.

Typical use::

    from gpucloud.ledger import open_ledger, EntryKind

    ledger = open_ledger("sqlite:///var/lib/gpucloud/ledger.db")
    ledger.ensure_account("alice")
    ledger.post_entry("alice", EntryKind.RECHARGE, 10_000, "order:42", at=now)
    ledger.open_meter("pod-uid-1", account="alice", resource="ns/inst-1",
                      kind="gpu_time", subject="pod-uid-1",
                      unit_price=Decimal("9.80"), unit="gpu_hour", opened_at=now)
    ledger.ingest_usage(records, received_at=now)  # rate_at=now: rate in the same transaction
    ledger.rate_pending(now)
    ledger.balance("alice")

Rules the ledger keeps (each is tested on SQLite and PostgreSQL):

- Entries are append-only (database triggers refuse UPDATE/DELETE). An entry's
  content for idempotency is (account, kind, amount, resource); memo, at and meta of a
  replay are ignored. Each entry stores ``balance_after``; the account row caches the
  balance and is updated under its row lock (SELECT ... FOR UPDATE on PostgreSQL,
  BEGIN IMMEDIATE on SQLite) in the transaction that inserts the entry.
- Usage: natural key (kind, subject, start); no two records of one subject (GPU or
  volume) overlap. ``gpucloud.ledger.wire.parse_batch`` checks a JSON batch straight
  into a WireBatch that ingest_usage takes as well (the API's fast path). Meters match
  usage by (kind, owner): the pod UID for gpu_time, the
  volume id otherwise. A meter's window is [floor(opened_at), floor(closed_at)) in
  whole seconds; a record straddling a close is rated up to the close
  (``rated_until``) and its rest by the successor meter, if one covers it. Seconds no
  meter covers are never charged and stay listed by ``unrated_usage``.
- Charges: per meter, the exact cumulative quantity is kept; each rating posts
  ``next_posting(quantity x price / unit, posted)`` (gpucloud.billing.money), keyed
  ``meter:{meter_id}:{seq}``, in the transaction that marks the usage rated.
- Settlement: ``settle_meter`` finalizes a closed meter in one transaction (rates its
  pending usage, optionally bills the GPU-seconds still missing from control-plane
  timestamps, key ``meter-fallback:{meter_id}``, marks it settled). Usage of its window
  that arrives later is stored and counted on the meter (``late_records``,
  ``late_quantity``; ``meters(late_only=True)``), never charged.
- Recharges: orders credit with key ``order:{order_id}``, vouchers with
  ``voucher:{voucher_id}``; every state change and refusal goes to the audit trail.
- Node wipes (``request_wipe``, ``pending_wipes``, ``complete_wipe``): folders on a
  node's local disk that the node's agent removes; one request per subject.
- Model billing (``record_model_requests``, ``replica_online``/``replica_offline``,
  ``settle_model_online``): the gateway's request usage, recorded and charged in one
  transaction per batch, idempotent on (model, request id); the operator's replica
  online intervals, settled as the delta of the rounded cumulative total (keys
  ``model-request:<ns>/<model>:<id>``, ``model-online:<ns>/<model>:to:<N>``).
- Image copies (``request_image_copy``, ``pending_image_copies``,
  ``complete_image_copy``, ``fail_image_copy``, ``cancel_image_copy``): an instance
  folder the agent of its node copies into an image folder; one request per subject.
"""

from gpucloud.ledger.errors import (
    IdempotencyConflict,
    InvalidInput,
    LedgerError,
    NotFound,
    OrderRefused,
    ReviewRefused,
    WrongNode,
)
from gpucloud.ledger.ledger import Ledger, open_ledger
from gpucloud.ledger.types import (
    Account,
    AuditEvent,
    Entry,
    EntryKind,
    GpuActivity,
    ImageCopy,
    IngestResult,
    Meter,
    MeterKind,
    MeterUnit,
    NodeWipe,
    Order,
    OrderStatus,
    PostResult,
    Unposted,
    UnratedUsage,
    UsageSummaryRow,
    Voucher,
    VoucherStatus,
)

__all__ = [
    "Account",
    "AuditEvent",
    "Entry",
    "EntryKind",
    "GpuActivity",
    "IdempotencyConflict",
    "ImageCopy",
    "IngestResult",
    "InvalidInput",
    "Ledger",
    "LedgerError",
    "Meter",
    "MeterKind",
    "MeterUnit",
    "NodeWipe",
    "NotFound",
    "Order",
    "OrderRefused",
    "OrderStatus",
    "PostResult",
    "ReviewRefused",
    "Unposted",
    "UnratedUsage",
    "UsageSummaryRow",
    "Voucher",
    "VoucherStatus",
    "WrongNode",
    "open_ledger",
]
