"""A period's spending per resource (budgets), against an oracle over the posted entries
and against the monthly statement built from the same entries; the accrual by resource
sums to the account's accrual."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0

from gpucloud.billing.statement import Line, Period, build
from gpucloud.ledger import InvalidInput, Ledger

NOV = Period(2026, 11)
ACCOUNTS = itertools.count()
SIGN = {"charge": -1, "refund": 1, "recharge": 1, "adjustment": -1}
ENTRY = st.tuples(
    st.sampled_from(sorted(SIGN)),
    st.integers(1, 10**7),
    st.sampled_from([None, "team-a/x", "team-a/y", "model/team-b/m#online"]),
    # from a day before November to a day after it, to the second
    st.integers(-86_400, 31 * 86_400),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=st.lists(ENTRY, max_size=30))
def test_spent_by_resource_is_charges_net_of_refunds_in_the_period(
    ledger: Ledger, entries: list[tuple[str, int, str | None, int]]
) -> None:
    account = f"acct-{next(ACCOUNTS)}"
    ledger.ensure_account(account)
    lines = []
    for i, (kind, amount, resource, offset) in enumerate(entries):
        at = NOV.start + timedelta(seconds=offset)
        ledger.post_entry(
            account, kind, SIGN[kind] * amount, f"{account}-{i}", resource=resource, at=at
        )
        lines.append(Line(at, kind, SIGN[kind] * amount, resource, ""))
    oracle: dict[str | None, int] = {}
    for kind, amount, resource, offset in entries:
        if kind in ("charge", "refund") and 0 <= offset < 30 * 86_400:  # November has 30 days
            oracle[resource] = oracle.get(resource, 0) - SIGN[kind] * amount
    assert ledger.spent_by_resource(account, NOV.start, NOV.end) == oracle
    # the statement of November says the same, resource by resource
    statement = build(account, "CNY", NOV, lines)
    from_statement: dict[str | None, int] = {}
    for line in [*(x for g in statement.charges for x in g.lines), *statement.refunds]:
        from_statement[line.resource] = from_statement.get(line.resource, 0) - line.amount_minor
    assert ledger.spent_by_resource(account, NOV.start, NOV.end) == from_statement


def test_period_edges_and_bad_input(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    last_oct = NOV.start - timedelta(seconds=1)
    for i, at in enumerate((last_oct, NOV.start, NOV.end - timedelta(seconds=1), NOV.end)):
        ledger.post_entry("alice", "charge", -(10**i), f"k{i}", resource="team-a/x", at=at)
    assert ledger.spent_by_resource("alice", NOV.start, NOV.end) == {"team-a/x": 10 + 100}
    with pytest.raises(InvalidInput, match="since"):
        ledger.spent_by_resource("alice", datetime(2026, 11, 1), NOV.end)  # naive


def test_unposted_by_resource_sums_to_unposted(ledger: Ledger) -> None:
    ledger.ensure_account("acme")
    for i, (resource, gpus) in enumerate((("team-a/x", 1), ("team-a/y", 2), ("team-a/x", 1))):
        ledger.open_meter(
            f"m{i}",
            account="acme",
            resource=resource,
            kind="gpu_time",
            subject=f"pod-{i}",
            unit_price=Decimal("19.80"),
            unit="gpu_hour",
            opened_at=T0,
            gpus=gpus,
        )
    ledger.close_meter("m2", T0 + timedelta(seconds=101))
    now = T0 + timedelta(seconds=3_601)
    by_resource = ledger.unposted_by_resource("acme", now)
    total = ledger.unposted("acme", now)
    # 19.80/h: 3601 s = 19.8055 -> 19.81; 2 GPUs 39.61; the stopped run 101 s = 0.5555 -> 0.56
    assert by_resource["team-a/x"].open_minor == 19_81
    assert by_resource["team-a/x"].closed_minor == 56
    assert by_resource["team-a/y"].open_minor == 39_61
    assert total.open_minor == sum(u.open_minor for u in by_resource.values())
    assert total.closed_minor == sum(u.closed_minor for u in by_resource.values())
