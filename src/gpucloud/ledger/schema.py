"""Table definitions (SQLAlchemy Core). The migrations in ``migrations/versions`` create
exactly these; a test compares the two so they cannot drift apart.

Instants are stored as integer microseconds since the epoch (``Instant``) so SQLite and
PostgreSQL round-trip timezone-aware UTC datetimes identically; usage intervals are
integer POSIX seconds, as on the wire.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias), not BIGINT.
ID = BigInteger().with_variant(Integer(), "sqlite")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(when: datetime) -> int:
    """Exact integer microseconds since the epoch of an aware datetime."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


class Instant(TypeDecorator[datetime]):
    """An aware UTC datetime stored as BIGINT microseconds."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> int | None:
        return None if value is None else to_us(value)

    def process_result_value(self, value: int | None, dialect: Any) -> datetime | None:
        return None if value is None else from_us(int(value))


metadata = MetaData()

accounts = Table(
    "ledger_accounts",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("currency", String(8), nullable=False),
    # Cached sum of the account's entries, only ever updated under the account's row
    # lock in the transaction that inserts the entry (tests prove it equals the sum).
    Column("balance_minor", BigInteger, nullable=False),
    Column("created_at", Instant, nullable=False),
)

entries = Table(
    "ledger_entries",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("key", String(255), nullable=False, unique=True),
    Column("resource", String(253)),
    Column("memo", Text, nullable=False),
    Column("at", Instant, nullable=False),
    Column("meta", JSON, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("recorded_at", Instant, nullable=False),
    Index("ix_ledger_entries_account", "account_id", "id"),
    Index("ix_ledger_entries_account_resource", "account_id", "resource", "id"),
    # a month's spending of an account (budgets): a range of ``at``, not all entries
    Index("ix_ledger_entries_account_at", "account_id", "at"),
)

usage = Table(
    "ledger_usage",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("kind", String(24), nullable=False),
    Column("subject", String(253), nullable=False),  # GPU UUID or volume id
    Column("start_s", BigInteger, nullable=False),
    Column("end_s", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("measure", BigInteger, nullable=False),  # GPU-seconds or byte-seconds
    Column("owner", String(253), nullable=False),  # pod UID (gpu_time) or volume id
    Column("node", String(253), nullable=False),
    Column("namespace", String(253)),
    Column("pod_name", String(253)),
    Column("gpu_product", String(253)),
    Column("digest", String(64), nullable=False),  # of the whole record: same key, same content?
    Column("received_at", Instant, nullable=False),
    # Rated up to this second (starts at start_s): a record straddling the close of one
    # meter and the opening of the next is rated by both, each for its own seconds.
    Column("rated_until", BigInteger, nullable=False),
    Column("meter_id", String(253)),  # the meter that rated it (last), NULL until then
    Column("rated_at", Instant),
    # UsageRecord.activity (gpu_time; NULL without it): idle-GPU detection, not billing
    Column("util_max", Integer),
    Column("memory_max", BigInteger),
    Column("samples", Integer),
    UniqueConstraint("kind", "subject", "start_s", name="uq_ledger_usage_natural_key"),
    Index(
        "ix_ledger_usage_unrated",
        "kind",
        "owner",
        "start_s",
        sqlite_where=text("rated_until < end_s"),
        postgresql_where=text("rated_until < end_s"),
    ),
    # (meter_id, end_s) serves lookups by meter alone too: no second index (0010)
    Index("ix_ledger_usage_meter_end", "meter_id", "end_s"),
)

meters = Table(
    "ledger_meters",
    metadata,
    Column("meter_id", String(253), primary_key=True),
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("resource", String(253), nullable=False),
    Column("kind", String(24), nullable=False),
    Column("subject", String(253), nullable=False),
    Column("unit_price", String(64), nullable=False),  # exact decimal text
    Column("unit", String(16), nullable=False),
    Column("opened_at", Instant, nullable=False),
    Column("closed_at", Instant),
    Column("memo", Text, nullable=False),
    Column("gpus", Integer, nullable=False),
    # Exact cumulative quantity rated (GPU-seconds or byte-seconds) as decimal integer
    # text: byte-seconds of a large disk over a year exceed 64 bits.
    Column("quantity_rated", Text, nullable=False),
    Column("posted_minor", BigInteger, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("last_usage_end", BigInteger),  # POSIX s, for accrual estimates
    # Settlement (settle_meter): the run is billed for good. Usage that arrives later is
    # stored and counted here as late, never charged (the fallback already billed it).
    Column("settled_at", Instant),
    Column("fallback_quantity", BigInteger, nullable=False, server_default="0"),
    Column("fallback_minor", BigInteger, nullable=False, server_default="0"),
    Column("late_quantity", Text, nullable=False, server_default="0"),
    Column("late_records", BigInteger, nullable=False, server_default="0"),
    # What the meter was opened for (docs/api.md, "What a node may report"): usage is
    # charged only from this node (bound at open, or by the first report), for at most
    # ``gpus`` GPU UUIDs (a JSON list, bound by the first reports) and, for volumes, at
    # most ``max_bytes`` bytes (the quota or capacity).
    Column("node", String(253)),
    Column("gpu_uuids", Text),
    Column("max_bytes", BigInteger),
    # The GPU product it was opened for (NULL: any): records of another product, or whose
    # device is of another kind (a MIG slice, a replica, a whole GPU), are refused.
    Column("gpu_product", String(253)),
    Index("ix_ledger_meters_subject", "kind", "subject"),
    Index("ix_ledger_meters_account", "account_id"),
)

orders = Table(
    "ledger_orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Instant, nullable=False),
    Column("expires_at", Instant, nullable=False),
    Column("provider_txn", String(128)),
    Column("paid_at", Instant),
    Column("entry_id", ID),
    # The client's idempotency key, unique per account; order_id (what the provider
    # sees) is always the ledger's own.
    Column("client_ref", String(64)),
    UniqueConstraint("provider", "provider_txn", name="uq_ledger_orders_txn"),
    UniqueConstraint("account_id", "client_ref", name="uq_ledger_orders_client_ref"),
    Index("ix_ledger_orders_status", "status", "expires_at"),
)

vouchers = Table(
    "ledger_vouchers",
    metadata,
    Column("voucher_id", String(64), primary_key=True),
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("payer", String(253), nullable=False),
    Column("bank", String(253), nullable=False),
    Column("transfer_no", String(128), nullable=False),
    Column("file_sha256", String(64)),
    Column("status", String(16), nullable=False),
    Column("submitted_at", Instant, nullable=False),
    Column("reviewer", String(253)),
    Column("reason", Text),
    Column("reviewed_at", Instant),
    Column("entry_id", ID),
    Column("submitter", String(253)),  # who submitted it: never its reviewer
    # Per account: another tenant's transfer number reveals nothing; approval refuses a
    # transfer already credited to any account.
    UniqueConstraint("account_id", "bank", "transfer_no", name="uq_ledger_vouchers_transfer"),
    Index("ix_ledger_vouchers_status", "status"),
)

audit = Table(
    "ledger_audit",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("account_id", ID),
    Column("at", Instant, nullable=False),
    Column("actor", String(253), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("detail", JSON, nullable=False),
    Index("ix_ledger_audit_account", "account_id", "id"),
)

# Folders a node's agent must remove (node-local instance volumes deleted after arrears):
# the operator requests, the agent of that node polls and reports (docs/arrears.md).
node_wipes = Table(
    "ledger_node_wipes",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("node", String(253), nullable=False),
    Column("path", String(1024), nullable=False),  # relative to the node's data root
    Column("subject", String(255), nullable=False),  # one request per subject
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("requested_at", Instant, nullable=False),
    Column("done_at", Instant),
    Column("bytes_freed", BigInteger),
    UniqueConstraint("subject", name="uq_ledger_node_wipes_subject"),
    Index("ix_ledger_node_wipes_node", "node", "done_at"),
)

# Image copies: an Image's data is copied by the agent of the node that holds its
# source instance's folder (gpucloud.ledger.image_copies).
image_copies = Table(
    "ledger_image_copies",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("node", String(253), nullable=False),
    Column("source", String(1024), nullable=False),  # instances/<ns>/<name>
    Column("path", String(1024), nullable=False),  # images/<ns>/<name>
    Column("subject", String(255), nullable=False),  # one request per subject (image uid)
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("requested_at", Instant, nullable=False),
    Column("done_at", Instant),
    Column("outcome", String(16)),  # NULL pending; copied, failed, cancelled
    Column("bytes_used", BigInteger),
    Column("message", String(1024)),
    UniqueConstraint("subject", name="uq_ledger_image_copies_subject"),
    Index("ix_ledger_image_copies_node", "node", "done_at"),
)

# Model billing (issue 17): what the gateway metered and the operator saw online, in
# the same database as the money it turns into (see model_billing.py).
model_requests = Table(
    "ledger_model_requests",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),  # arrival order per meter
    Column("model", String(253), nullable=False),  # <namespace>/<name>
    Column("request_id", String(255), nullable=False),
    Column("account_id", ID, ForeignKey("ledger_accounts.id"), nullable=False),  # the payer
    Column("source", String(64), nullable=False),  # the gateway instance that served it
    Column("at", Instant, nullable=False),  # arrival
    Column("runtime_ms", BigInteger, nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("images", BigInteger, nullable=False),
    Column("videos", BigInteger, nullable=False),
    Column("amount", String(80)),  # exact Decimal; NULL: not billed per request
    Column("cumulative", String(80)),  # the (payer, model) meter's exact total after it
    UniqueConstraint("model", "request_id", name="uq_ledger_model_requests_request"),
    Index("ix_ledger_model_requests_meter", "account_id", "model", "id"),
    Index("ix_ledger_model_requests_source", "source", "at"),
)

model_replicas = Table(
    "ledger_model_replicas",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("model", String(253), nullable=False),
    Column("replica", String(253), nullable=False),  # the pod UID
    Column("start_at", Instant, nullable=False),
    Column("end_at", Instant),  # NULL: online
    UniqueConstraint("model", "replica", "start_at", name="uq_ledger_model_replicas_interval"),
)
