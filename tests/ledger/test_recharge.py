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
    order = ledger.create_order(alice, 5_000, "alipay", EXPIRES, order_id="o-1")
    assert order.status is OrderStatus.PENDING and order.entry_id is None
    assert ledger.create_order(alice, 5_000, "alipay", EXPIRES, order_id="o-1") == order
    with pytest.raises(IdempotencyConflict, match="order:o-1"):
        ledger.create_order(alice, 6_000, "alipay", EXPIRES, order_id="o-1")
    at = T0 + timedelta(minutes=1)
    paid = ledger.settle_order("o-1", "txn-9", 5_000, at)
    assert paid.status is OrderStatus.PAID and paid.provider_txn == "txn-9"
    for _ in range(3):
        assert ledger.settle_order("o-1", "txn-9", 5_000, at + timedelta(seconds=5)) == paid
    assert ledger.balance(alice) == 5_000
    assert [e.key for e in ledger.entries(alice)] == ["order:o-1"]
    with pytest.raises(OrderRefused, match="already_settled") as err:
        ledger.settle_order("o-1", "txn-10", 5_000, at)
    assert err.value.reason == "already_settled"
    assert ledger.balance(alice) == 5_000


def test_order_refusals_are_clear_and_audited(ledger: Ledger, alice: str) -> None:
    ledger.create_order(alice, 5_000, "wechat", EXPIRES, order_id="o-2")
    with pytest.raises(OrderRefused, match=r"amount_mismatch.*order is for 5000, paid 4999"):
        ledger.settle_order("o-2", "t1", 4_999, T0)
    with pytest.raises(OrderRefused, match="expired"):
        ledger.settle_order("o-2", "t1", 5_000, EXPIRES + timedelta(seconds=1))
    with pytest.raises(NotFound, match="order 'nope'"):
        ledger.settle_order("nope", "t1", 5_000, T0)
    ledger.create_order(alice, 100, "wechat", EXPIRES, order_id="o-3")
    ledger.settle_order("o-3", "t-shared", 100, T0)
    ledger.create_order(alice, 100, "wechat", EXPIRES, order_id="o-4")
    with pytest.raises(OrderRefused, match="txn_reused"):
        ledger.settle_order("o-4", "t-shared", 100, T0)
    assert ledger.balance(alice) == 100
    actions = [(e.action, e.subject, e.detail.get("reason")) for e in ledger.audit_events(alice)]
    assert ("order.refused", "o-2", "amount_mismatch") in actions
    assert ("order.refused", "o-2", "expired") in actions
    assert ("order.paid", "o-3", None) in actions
    assert ("order.refused", "o-4", "txn_reused") in actions


def test_expire_orders_then_settlement_is_refused(ledger: Ledger, alice: str) -> None:
    ledger.create_order(alice, 100, "alipay", EXPIRES, order_id="late")
    ledger.create_order(alice, 100, "alipay", EXPIRES + timedelta(hours=1), order_id="fresh")
    assert ledger.expire_orders(EXPIRES) == ["late"]
    assert ledger.expire_orders(EXPIRES) == []
    assert ledger.get_order("late").status is OrderStatus.EXPIRED
    with pytest.raises(OrderRefused, match="expired"):
        ledger.settle_order("late", "t", 100, T0)  # in time by the clock, but expired
    assert ledger.settle_order("fresh", "t", 100, EXPIRES).status is OrderStatus.PAID
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
