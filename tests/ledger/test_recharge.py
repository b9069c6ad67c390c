"""Recharge persistence: payment orders and bank-transfer vouchers, with an audit trail."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ledger_helpers import T0
from sqlalchemy import update

from gpucloud.ledger import (
    IdempotencyConflict,
    InvalidInput,
    Ledger,
    NotFound,
    OrderRefused,
    OrderStatus,
    ReviewRefused,
    VoucherStatus,
    schema,
)

EXPIRES = T0 + timedelta(minutes=15)
SHA = "ab" * 32


@pytest.fixture
def alice(ledger: Ledger) -> str:
    ledger.ensure_account("alice")
    return "alice"


def test_order_settles_exactly_once_however_often_replayed(ledger: Ledger, alice: str) -> None:
    order = ledger.create_order(alice, 5_000, "alipay", EXPIRES, client_ref="o-1")
    assert order.status is OrderStatus.PENDING and order.entry_id is None
    assert ledger.create_order(alice, 5_000, "alipay", EXPIRES, client_ref="o-1") == order
    with pytest.raises(IdempotencyConflict, match="order:o-1"):
        ledger.create_order(alice, 6_000, "alipay", EXPIRES, client_ref="o-1")
    oid = order.order_id
    at = T0 + timedelta(minutes=1)
    paid = ledger.settle_order(oid, "txn-9", 5_000, at)
    assert paid.status is OrderStatus.PAID and paid.provider_txn == "txn-9"
    for _ in range(3):
        assert ledger.settle_order(oid, "txn-9", 5_000, at + timedelta(seconds=5)) == paid
    assert ledger.balance(alice) == 5_000
    assert [e.key for e in ledger.entries(alice)] == [f"order:{oid}"]
    with pytest.raises(OrderRefused, match="already_settled") as err:
        ledger.settle_order(oid, "txn-10", 5_000, at)
    assert err.value.reason == "already_settled"
    assert ledger.balance(alice) == 5_000


def test_client_order_refs_are_per_account(ledger: Ledger, alice: str) -> None:
    """One tenant cannot squat another's order id (issue 16, finding 7): the order id the
    provider sees is the ledger's own; a client's reference is scoped to its account."""
    ledger.ensure_account("mallory")
    squat = ledger.create_order("mallory", 1, "alipay", EXPIRES, client_ref="pay-2026-001")
    mine = ledger.create_order(alice, 5_000, "alipay", EXPIRES, client_ref="pay-2026-001")
    assert mine.order_id != squat.order_id and (mine.account, mine.amount_minor) == (alice, 5_000)
    assert ledger.find_order(alice, "pay-2026-001") == mine
    assert ledger.find_order("mallory", "pay-2026-001") == squat
    ledger.settle_order(mine.order_id, "txn-1", 5_000, T0)
    assert (ledger.balance(alice), ledger.balance("mallory")) == (5_000, 0)


def test_order_refusals_are_clear_and_audited(ledger: Ledger, alice: str) -> None:
    o2 = ledger.create_order(alice, 5_000, "wechat", EXPIRES).order_id
    with pytest.raises(OrderRefused, match=r"amount_mismatch.*order is for 5000, paid 4999"):
        ledger.settle_order(o2, "t1", 4_999, T0)
    with pytest.raises(OrderRefused, match="expired"):
        ledger.settle_order(o2, "t1", 5_000, EXPIRES + timedelta(seconds=1))
    with pytest.raises(NotFound, match="order 'nope'"):
        ledger.settle_order("nope", "t1", 5_000, T0)
    o3 = ledger.create_order(alice, 100, "wechat", EXPIRES).order_id
    ledger.settle_order(o3, "t-shared", 100, T0)
    o4 = ledger.create_order(alice, 100, "wechat", EXPIRES).order_id
    with pytest.raises(OrderRefused, match="txn_reused"):
        ledger.settle_order(o4, "t-shared", 100, T0)
    assert ledger.balance(alice) == 100
    actions = [(e.action, e.subject, e.detail.get("reason")) for e in ledger.audit_events(alice)]
    assert ("order.refused", o2, "amount_mismatch") in actions
    assert ("order.refused", o2, "expired") in actions
    assert ("order.paid", o3, None) in actions
    assert ("order.refused", o4, "txn_reused") in actions


def test_expire_orders_then_settlement_is_refused(ledger: Ledger, alice: str) -> None:
    late = ledger.create_order(alice, 100, "alipay", EXPIRES).order_id
    fresh = ledger.create_order(alice, 100, "alipay", EXPIRES + timedelta(hours=1)).order_id
    assert ledger.expire_orders(EXPIRES) == [late]
    assert ledger.expire_orders(EXPIRES) == []
    assert ledger.get_order(late).status is OrderStatus.EXPIRED
    with pytest.raises(OrderRefused, match="expired"):
        ledger.settle_order(late, "t", 100, T0)  # in time by the clock, but expired
    assert ledger.settle_order(fresh, "t", 100, EXPIRES).status is OrderStatus.PAID
    assert ledger.balance(alice) == 100


def test_order_input_rules(ledger: Ledger, alice: str) -> None:
    with pytest.raises(InvalidInput, match="amount_minor: must be > 0"):
        ledger.create_order(alice, 0, "alipay", EXPIRES)
    with pytest.raises(InvalidInput, match="expires_at: must be a timezone-aware"):
        ledger.create_order(alice, 1, "alipay", EXPIRES.replace(tzinfo=None))
    generated = ledger.create_order(alice, 1, "alipay", EXPIRES)
    assert len(generated.order_id) == 32


def test_voucher_approval_credits_once(ledger: Ledger, alice: str) -> None:
    v = ledger.submit_voucher(alice, 100_000, "ACME Ltd", "ICBC", "TX-1", SHA, T0)
    assert v.status is VoucherStatus.PENDING
    assert ledger.submit_voucher(alice, 100_000, "ACME Ltd", "ICBC", "TX-1", SHA, T0) == v
    with pytest.raises(IdempotencyConflict, match="TX-1"):
        ledger.submit_voucher(alice, 99_000, "ACME Ltd", "ICBC", "TX-1", SHA, T0)
    assert [x.voucher_id for x in ledger.vouchers(status="pending")] == [v.voucher_id]
    done = ledger.review_voucher(v.voucher_id, True, "admin:bob", "", T0 + timedelta(hours=1))
    assert done.status is VoucherStatus.APPROVED and done.reviewer == "admin:bob"
    assert ledger.balance(alice) == 100_000
    with pytest.raises(ReviewRefused, match=r"already_reviewed.*approved by admin:bob"):
        ledger.review_voucher(v.voucher_id, True, "admin:eve", "", T0)
    with pytest.raises(ReviewRefused):
        ledger.review_voucher(v.voucher_id, False, "admin:eve", "oops", T0)
    assert ledger.balance(alice) == 100_000
    assert ledger.get_entry(f"voucher:{v.voucher_id}").amount_minor == 100_000


def test_voucher_rejection_needs_a_reason(ledger: Ledger, alice: str) -> None:
    v = ledger.submit_voucher(alice, 500, "Bob", "BOC", "TX-2", SHA, T0)
    with pytest.raises(InvalidInput, match="reason: must not be empty"):
        ledger.review_voucher(v.voucher_id, False, "admin:bob", "  ", T0)
    rejected = ledger.review_voucher(v.voucher_id, False, "admin:bob", "no such transfer", T0)
    assert rejected.status is VoucherStatus.REJECTED and rejected.reason == "no such transfer"
    assert ledger.balance(alice) == 0
    with pytest.raises(InvalidInput, match="file_sha256"):
        ledger.submit_voucher(alice, 500, "Bob", "BOC", "TX-3", "xyz", T0)
    with pytest.raises(NotFound):
        ledger.review_voucher("nope", True, "admin", "", T0)
    trail = [(e.actor, e.action) for e in ledger.audit_events(alice)]
    assert trail == [("user:alice", "voucher.submitted"), ("admin:bob", "voucher.rejected")]


def test_a_voucher_needs_its_file(ledger: Ledger, alice: str) -> None:
    """The seed has the payer upload the voucher: no file, no voucher; a voucher stored
    without one (before it was required) cannot be approved, only rejected."""
    with pytest.raises(InvalidInput, match=r"^file_sha256: a bank transfer needs its voucher"):
        ledger.submit_voucher(alice, 500, "Bob", "BOC", "TX-9", None, T0)  # type: ignore[arg-type]
    assert ledger.vouchers() == []
    v = ledger.submit_voucher(alice, 500, "Bob", "BOC", "TX-9", SHA, T0)
    submitted = ledger.audit_events(alice)[-1]
    assert submitted.action == "voucher.submitted" and submitted.detail["file_sha256"] == SHA
    with ledger.engine.begin() as conn:  # as an older version stored it
        conn.execute(
            update(schema.vouchers)
            .where(schema.vouchers.c.voucher_id == v.voucher_id)
            .values(file_sha256=None)
        )
    with pytest.raises(ReviewRefused, match="no_voucher_file"):
        ledger.review_voucher(v.voucher_id, True, "admin:bob", "", T0)
    assert ledger.balance(alice) == 0
    rejected = ledger.review_voucher(v.voucher_id, False, "admin:bob", "no voucher", T0)
    assert rejected.status is VoucherStatus.REJECTED


def test_a_submitter_never_reviews_their_own_voucher(ledger: Ledger, alice: str) -> None:
    """Issue 16, finding 4: one person submitted and approved 10^12 minor units."""
    v = ledger.submit_voucher(alice, 10**12, "ACME", "ICBC", "TX-5", SHA, T0, submitter="eve")
    with pytest.raises(ReviewRefused, match="own_voucher") as err:
        ledger.review_voucher(v.voucher_id, True, "eve", "", T0)
    assert err.value.reason == "own_voucher" and ledger.balance(alice) == 0
    trail = [(e.actor, e.action) for e in ledger.audit_events(alice)]
    assert trail == [("eve", "voucher.submitted"), ("eve", "voucher.review_refused")]
    assert ledger.review_voucher(v.voucher_id, True, "bob", "", T0).reviewer == "bob"
    assert ledger.balance(alice) == 10**12


def test_transfer_numbers_are_per_account_and_credited_once(ledger: Ledger, alice: str) -> None:
    """Issue 16, finding 7: another tenant's voucher for the same transfer number is its
    own (the error revealed the other voucher's id); a transfer is credited once."""
    ledger.ensure_account("mallory")
    theirs = ledger.submit_voucher("mallory", 9_000, "M", "ICBC", "TX-6", SHA, T0)
    mine = ledger.submit_voucher(alice, 7_000, "ACME", "ICBC", "TX-6", SHA, T0)
    assert mine.voucher_id != theirs.voucher_id
    with pytest.raises(IdempotencyConflict) as err:
        ledger.submit_voucher(alice, 7_001, "ACME", "ICBC", "TX-6", SHA, T0)
    assert theirs.voucher_id not in str(err.value) and "mallory" not in str(err.value)
    ledger.review_voucher(mine.voucher_id, True, "bob", "", T0)
    with pytest.raises(ReviewRefused, match="transfer_credited"):
        ledger.review_voucher(theirs.voucher_id, True, "bob", "", T0)
    assert (ledger.balance(alice), ledger.balance("mallory")) == (7_000, 0)
    ledger.review_voucher(theirs.voucher_id, False, "bob", "transfer already credited", T0)
