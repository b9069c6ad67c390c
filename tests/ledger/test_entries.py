"""Accounts and append-only entries: signs, idempotency, balance, statements."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ledger_helpers import T0
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from gpucloud.ledger import (
    EntryKind,
    IdempotencyConflict,
    InvalidInput,
    Ledger,
    NotFound,
)


def test_ensure_account_is_idempotent_and_keeps_currency(ledger: Ledger) -> None:
    a = ledger.ensure_account("alice")
    assert (a.name, a.currency, a.balance_minor) == ("alice", "CNY", 0)
    assert ledger.ensure_account("alice") == a
    with pytest.raises(InvalidInput, match="currency"):
        ledger.ensure_account("alice", "USD")
    with pytest.raises(InvalidInput, match="currency"):
        ledger.ensure_account("bob", "XXX")
    with pytest.raises(NotFound, match="'nobody'"):
        ledger.get_account("nobody")
    assert [x.name for x in ledger.accounts()] == ["alice"]


def test_post_replay_and_conflict(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    first = ledger.post_entry("alice", "recharge", 10_000, "k1", at=T0, memo="top up")
    assert first.created and first.entry.amount_minor == 10_000
    assert first.entry.balance_after == 10_000
    # A replay, even with a later timestamp and another memo, is the same entry.
    again = ledger.post_entry("alice", EntryKind.RECHARGE, 10_000, "k1", at=T0 + timedelta(1))
    assert not again.created and again.entry == first.entry
    assert ledger.balance("alice") == 10_000
    with pytest.raises(IdempotencyConflict, match=r"'k1'.*amount_minor 10000 != 9999"):
        ledger.post_entry("alice", "recharge", 9_999, "k1", at=T0)
    ledger.ensure_account("bob")
    with pytest.raises(IdempotencyConflict, match="account"):
        ledger.post_entry("bob", "recharge", 10_000, "k1", at=T0)
    with pytest.raises(IdempotencyConflict, match="resource"):
        ledger.post_entry("alice", "recharge", 10_000, "k1", at=T0, resource="x")
    assert ledger.balance("alice") == 10_000
    assert ledger.balance("bob") == 0
    assert ledger.get_entry("k1") == first.entry


@pytest.mark.parametrize(
    ("kind", "amount"),
    [
        ("recharge", 0),
        ("recharge", -1),
        ("refund", -5),
        ("charge", 1),
        ("charge", 0),
        ("adjustment", 0),
    ],
)
def test_sign_rules(ledger: Ledger, kind: str, amount: int) -> None:
    ledger.ensure_account("alice")
    with pytest.raises(InvalidInput, match=f"amount_minor: a {kind} entry must be"):
        ledger.post_entry("alice", kind, amount, "k", at=T0)


def test_bad_input_names_the_field(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    with pytest.raises(InvalidInput, match="kind: 'gift' is not one of"):
        ledger.post_entry("alice", "gift", 1, "k", at=T0)
    with pytest.raises(InvalidInput, match="amount_minor: must be an int"):
        ledger.post_entry("alice", "recharge", 1.5, "k", at=T0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="amount_minor: must be an int"):
        ledger.post_entry("alice", "recharge", True, "k", at=T0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="at: must be a timezone-aware"):
        ledger.post_entry("alice", "recharge", 1, "k", at=T0.replace(tzinfo=None))
    with pytest.raises(InvalidInput, match="key: must not be empty"):
        ledger.post_entry("alice", "recharge", 1, " ", at=T0)
    with pytest.raises(NotFound, match="account 'ghost'"):
        ledger.post_entry("ghost", "recharge", 1, "k", at=T0)


def test_statement_running_balance_paging_and_resource(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.post_entry("alice", "recharge", 5_000, "r1", at=T0)
    ledger.post_entry("alice", "charge", -1_234, "c1", at=T0, resource="ns/a")
    ledger.post_entry("alice", "charge", -766, "c2", at=T0, resource="ns/b")
    ledger.post_entry("alice", "refund", 100, "f1", at=T0, resource="ns/a")
    ledger.post_entry("alice", "adjustment", -1, "a1", at=T0, meta={"actor": "admin:root"})
    rows = ledger.entries("alice")
    assert [e.key for e in rows] == ["r1", "c1", "c2", "f1", "a1"]
    assert [e.balance_after for e in rows] == [5_000, 3_766, 3_000, 3_100, 3_099]
    assert ledger.balance("alice") == 3_099 == ledger.entries_sum("alice")
    page1 = ledger.entries("alice", limit=2)
    page2 = ledger.entries("alice", after_id=page1[-1].id, limit=2)
    assert [e.key for e in page1 + page2] == ["r1", "c1", "c2", "f1"]
    only_a = ledger.entries("alice", resource="ns/a")
    assert [(e.key, e.balance_after) for e in only_a] == [("c1", 3_766), ("f1", 3_100)]
    assert ledger.charges_by_resource("alice") == {"ns/a": 1_234, "ns/b": 766}
    assert rows[-1].meta == {"actor": "admin:root"}
    actors = {(ev.subject, ev.actor) for ev in ledger.audit_events("alice")}
    assert ("a1", "admin:root") in actors and ("r1", "system") in actors
    with pytest.raises(InvalidInput, match="limit"):
        ledger.entries("alice", limit=0)


def test_no_update_or_delete_api(ledger: Ledger) -> None:
    names = {n for n in dir(ledger) if not n.startswith("_")}
    assert not {n for n in names if n.startswith(("update", "delete", "remove", "edit"))}


def test_database_refuses_update_and_delete_of_entries(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.post_entry("alice", "recharge", 100, "k", at=T0)
    for sql in (
        "UPDATE ledger_entries SET amount_minor = 1",
        "DELETE FROM ledger_entries",
        "DELETE FROM ledger_audit",
    ):
        with pytest.raises(DBAPIError, match="append-only"), ledger.engine.begin() as conn:
            conn.execute(text(sql))
    assert ledger.entries_sum("alice") == 100
