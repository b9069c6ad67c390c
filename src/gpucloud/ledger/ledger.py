"""The Ledger facade: one object, the same public API, one small part per aggregate.

``Ledger`` owns one ``Store`` (the engine, the clock, the shared lookups: store.py) and
one object per aggregate, and delegates each public method to the part that keeps it:

==================  =========================================================
accounts.py         accounts and balances (``ensure_account``, ``balance``)
entries.py          posting with idempotency keys, reading entries
usage.py            usage ingest (admission, rating on arrival), usage reads
meters.py           meters: open, close, rate (charges), settle
accrual.py          what running meters owe: ``unposted``, ``available_balance``
orders.py           online payment orders
vouchers.py         bank-transfer vouchers and their review
audit.py            the audit trail (read, and records without money)
wipes.py            node folder wipes the agents perform
image_copies.py     instance-to-image copies the agents perform
model_billing.py    model requests and replica online time, and their charges
==================  =========================================================

The rules below hold for every part; the parts cooperate only through the objects the
facade hands them (usage -> meters -> entries, orders and vouchers -> entries,
accrual -> accounts), never through the facade.

Transactions
  Every operation that changes state runs in one transaction, apart from
  ``rate_pending`` (one transaction per batch of meters, each complete in itself) and
  retries after an IntegrityError (``ensure_account``; ``post_entry`` racing another
  account on one key; ``request_wipe`` and ``request_image_copy`` whose concurrent twin
  won). Each read runs in one read-only snapshot (``available_balance`` reads the
  balance and the accrual in two). A balance changes only in ``Entries.post``, in the
  transaction that inserts the entry, under the account's row lock; that transaction
  also carries what the money is for: the usage marked rated and the meter's cumulative
  total (``Meters.charge``), the model request rows of a batch
  (``record_model_requests``), the order marked paid, the voucher marked approved, the
  meter marked settled, and the audit record. So all of it commits or none of it does:
  a crash never leaves a charge without its rated usage (or request row), a paid order
  without its credit, or the reverse. Refusals (OrderRefused, ReviewRefused)
  are raised after the commit, so the refused attempt stays in the audit trail.

Idempotency keys
  Every entry has a unique key: ``meter:{meter_id}:{seq}`` (a rating),
  ``meter-fallback:{meter_id}`` (settlement's control-plane fallback),
  ``order:{order_id}``, ``voucher:{voucher_id}``,
  ``model-request:{ns}/{model}:{request_id}``, ``model-online:{ns}/{model}:to:{N}``, or
  the caller's (``post_entry``).
  ``Entries.post`` looks the key up under the account's lock: the same (account, kind,
  amount, resource) returns the stored entry, other content raises IdempotencyConflict;
  the unique index is the last word when two accounts race on one key. Retried callers
  therefore never post twice. Usage is idempotent on its natural key (kind, subject,
  start); meters, orders (per account ``client_ref``), vouchers (per account bank and
  transfer number), wipes and image copies (per subject) on their own identities.

Locks (always taken in this order; the account row is the last lock of a transaction)
  usage lock -> meter rows -> account row (ingest, ``rate_pending``, ``settle_meter``);
  order row -> account row (``settle_order``); the accounts of a model request batch, in
  id order (``record_model_requests``); every voucher of one transfer, by id ->
  account row (``review_voucher``). Reads run in a read-only transaction (``Store.read``):
  one snapshot, never blocking writers.

SQLite vs PostgreSQL
  SQLite (WAL, busy timeout, synchronous=FULL): writers begin IMMEDIATE and so run one at
  a time; FOR UPDATE is a no-op and the usage lock is not needed; readers begin DEFERRED
  on a WAL snapshot. PostgreSQL (synchronous_commit=on): row locks with SELECT ... FOR
  UPDATE; the transactions that write or rate usage are serialised by a transaction-level
  advisory lock (``ingest.lock_usage``), so no usage row appears in the middle of a
  rating pass; reads run at REPEATABLE READ for one snapshot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine

from gpucloud.clock import Clock
from gpucloud.ledger import db
from gpucloud.ledger.accounts import Accounts
from gpucloud.ledger.accrual import Accrual
from gpucloud.ledger.audit import AuditTrail
from gpucloud.ledger.entries import Entries
from gpucloud.ledger.image_copies import ImageCopies
from gpucloud.ledger.meters import Meters
from gpucloud.ledger.model_billing import ModelBilling
from gpucloud.ledger.orders import Orders
from gpucloud.ledger.store import Store
from gpucloud.ledger.usage import Usage
from gpucloud.ledger.vouchers import Vouchers
from gpucloud.ledger.wipes import Wipes

P = ParamSpec("P")
T = TypeVar("T")


def open_ledger(url: str, *, clock: Clock | None = None) -> Ledger:
    """Open (creating or migrating to the newest schema) the ledger at ``url``.

    ``sqlite:///path/to/ledger.db`` is the embedded default (WAL, busy timeout, writers
    serialised with BEGIN IMMEDIATE); ``postgresql+psycopg://user@host:port/db`` is for
    production (row locks with SELECT ... FOR UPDATE). Alembic migrations run to head;
    opening from several processes at once is safe. ``clock`` stamps audit records.
    """
    engine = db.make_engine(url)
    db.migrate(engine)
    return Ledger(engine, clock)


def _to(part: str, method: Callable[Concatenate[Any, P], T]) -> Callable[Concatenate[Ledger, P], T]:
    """The Ledger method that runs ``method`` on the facade's ``part`` (same signature
    and docstring, for readers and ``help()``)."""

    @functools.wraps(method)
    def call(self: Ledger, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return method(getattr(self, part), *args, **kwargs)

    return call


class Ledger:
    """The durable record of accounts, entries, usage, meters, orders and vouchers.

    Thread-safe and process-safe: share one Ledger between threads, open one per process.
    """

    # Composition, not mixins: each part sees the Store and only the parts its constructor
    # names, so what a part may touch is written here, and no part reaches another's
    # methods through a shared ``self``.
    def __init__(self, engine: Engine, clock: Clock | None = None) -> None:
        store = self._store = Store(engine, clock)
        self._accounts = Accounts(store)
        self._entries = Entries(store)
        self._meters = Meters(store, self._entries)
        self._usage = Usage(store, self._meters)
        self._accrual = Accrual(store, self._accounts)
        self._orders = Orders(store, self._entries)
        self._vouchers = Vouchers(store, self._entries)
        self._audit_trail = AuditTrail(store)
        self._wipes = Wipes(store)
        self._image_copies = ImageCopies(store)
        self._model_billing = ModelBilling(store, self._accounts, self._entries)

    @property
    def engine(self) -> Engine:
        return self._store.engine

    @property
    def clock(self) -> Clock:
        """Stamps audit records and entries' ``recorded_at``."""
        return self._store.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._store.clock = clock

    @property
    def dialect(self) -> str:
        return self._store.dialect

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._store.engine.dispose()

    # -- accounts and balances (accounts.py) -------------------------------------------
    ensure_account = _to("_accounts", Accounts.ensure_account)
    get_account = _to("_accounts", Accounts.get_account)
    accounts = _to("_accounts", Accounts.accounts)
    balance = _to("_accounts", Accounts.balance)

    # -- entries (entries.py) ----------------------------------------------------------
    post_entry = _to("_entries", Entries.post_entry)
    entries_sum = _to("_entries", Entries.entries_sum)
    entries = _to("_entries", Entries.entries)
    get_entry = _to("_entries", Entries.get_entry)
    charges_by_resource = _to("_entries", Entries.charges_by_resource)
    charges_by_resources = _to("_entries", Entries.charges_by_resources)
    spent_by_resource = _to("_entries", Entries.spent_by_resource)

    # -- usage (usage.py) --------------------------------------------------------------
    ingest_usage = _to("_usage", Usage.ingest_usage)
    ingest_batches = _to("_usage", Usage.ingest_batches)
    unrated_usage = _to("_usage", Usage.unrated_usage)
    usage_summary = _to("_usage", Usage.usage_summary)
    gpus_seen = _to("_usage", Usage.gpus_seen)
    gpus_seen_by_pod = _to("_usage", Usage.gpus_seen_by_pod)
    usage_watermark = _to("_usage", Usage.usage_watermark)
    gpu_activity = _to("_usage", Usage.gpu_activity)

    # -- meters (meters.py) ------------------------------------------------------------
    open_meter = _to("_meters", Meters.open_meter)
    close_meter = _to("_meters", Meters.close_meter)
    settle_meter = _to("_meters", Meters.settle_meter)
    get_meter = _to("_meters", Meters.get_meter)
    get_meters = _to("_meters", Meters.get_meters)
    meters = _to("_meters", Meters.meters)
    rate_pending = _to("_meters", Meters.rate_pending)

    # -- accrual (accrual.py) ----------------------------------------------------------
    unposted = _to("_accrual", Accrual.unposted)
    unposted_by_resource = _to("_accrual", Accrual.unposted_by_resource)
    accrued_unsettled = _to("_accrual", Accrual.accrued_unsettled)
    available_balance = _to("_accrual", Accrual.available_balance)

    # -- recharge: online orders (orders.py) ---------------------------------------------
    create_order = _to("_orders", Orders.create_order)
    find_order = _to("_orders", Orders.find_order)
    get_order = _to("_orders", Orders.get_order)
    orders = _to("_orders", Orders.orders)
    settle_order = _to("_orders", Orders.settle_order)
    expire_orders = _to("_orders", Orders.expire_orders)

    # -- recharge: bank-transfer vouchers (vouchers.py) ----------------------------------
    submit_voucher = _to("_vouchers", Vouchers.submit_voucher)
    get_voucher = _to("_vouchers", Vouchers.get_voucher)
    vouchers = _to("_vouchers", Vouchers.vouchers)
    review_voucher = _to("_vouchers", Vouchers.review_voucher)

    # -- audit trail (audit.py) --------------------------------------------------------
    record_audit = _to("_audit_trail", AuditTrail.record_audit)
    audit_events = _to("_audit_trail", AuditTrail.audit_events)

    # -- node wipes (wipes.py) ---------------------------------------------------------
    request_wipe = _to("_wipes", Wipes.request_wipe)
    get_wipe = _to("_wipes", Wipes.get_wipe)
    pending_wipes = _to("_wipes", Wipes.pending_wipes)
    pending_wipe_at = _to("_wipes", Wipes.pending_wipe_at)
    complete_wipe = _to("_wipes", Wipes.complete_wipe)

    # -- image copies (image_copies.py) ------------------------------------------------
    request_image_copy = _to("_image_copies", ImageCopies.request_image_copy)
    get_image_copy = _to("_image_copies", ImageCopies.get_image_copy)
    pending_image_copies = _to("_image_copies", ImageCopies.pending_image_copies)
    complete_image_copy = _to("_image_copies", ImageCopies.complete_image_copy)
    fail_image_copy = _to("_image_copies", ImageCopies.fail_image_copy)
    cancel_image_copy = _to("_image_copies", ImageCopies.cancel_image_copy)

    # -- model requests and online time (model_billing.py) -----------------------------
    record_model_requests = _to("_model_billing", ModelBilling.record_model_requests)
    store_model_requests = _to("_model_billing", ModelBilling.store_requests)
    model_requests = _to("_model_billing", ModelBilling.model_requests)
    model_requests_known = _to("_model_billing", ModelBilling.model_requests_known)
    model_request_stats = _to("_model_billing", ModelBilling.model_request_stats)
    model_exact_total = _to("_model_billing", ModelBilling.model_exact_total)
    replica_online = _to("_model_billing", ModelBilling.replica_online)
    replica_offline = _to("_model_billing", ModelBilling.replica_offline)
    replica_intervals = _to("_model_billing", ModelBilling.replica_intervals)
    settle_model_online = _to("_model_billing", ModelBilling.settle_model_online)
