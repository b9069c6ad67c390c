"""The pure budget and runway rules against plain oracles: which tiers are reached, which
notice is due (once per tier per month; once per tier per runway episode), and whether
a start is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from gpucloud_operator import arrears as ar
from gpucloud_operator import budgets as bu
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucloud.billing import BillingError
from gpucloud.crd import SpecError, parse
from gpucloud.crd.account import AccountSpec, Budget

TIER_LISTS = st.lists(st.integers(1, 100), max_size=6)
AMOUNTS = st.integers(1, 10**9)


def test_month_is_the_utc_calendar_month() -> None:
    assert str(bu.month_of(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))) == "2026-12"
    east = datetime(2027, 1, 1, 7, 0, tzinfo=UTC).astimezone()  # any zone: read in UTC
    assert str(bu.month_of(east)) == "2027-01"
    month = bu.month_of(datetime(2026, 2, 14, tzinfo=UTC))
    assert (month.start, month.end) == (
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 3, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("resource", "namespace"),
    [
        ("team-a/job", "team-a"),
        ("model/team-a/llm", "team-a"),
        ("model/team-a/llm#online", "team-a"),
        ("team-b/scratch", "team-b"),
        (None, None),
        ("", None),
        ("orphan", None),
        ("model/", None),
    ],
)
def test_namespace_of_a_ledger_resource(resource: str | None, namespace: str | None) -> None:
    assert bu.namespace_of(resource) == namespace


@given(
    posted=st.dictionaries(
        st.sampled_from([None, "a/x", "a/y", "b/x", "model/a/m", "model/b/m#online", "odd"]),
        st.integers(-(10**6), 10**6),
    ),
    unposted=st.dictionaries(st.sampled_from(["a/x", "b/x", "a/z"]), st.integers(0, 10**6)),
    namespace=st.sampled_from([None, "a", "b", "c"]),
)
def test_scope_spent_against_an_oracle(
    posted: dict[str | None, int], unposted: dict[str, int], namespace: str | None
) -> None:
    def mine(res: str | None) -> bool:
        if namespace is None:
            return True
        name = (res or "").removeprefix("model/")
        return name.split("/")[0] == namespace and "/" in name

    total = sum(v for k, v in posted.items() if mine(k)) + sum(
        v for k, v in unposted.items() if mine(k)
    )
    assert bu.scope_spent(posted, unposted, namespace) == max(0, total)


@given(spent=st.integers(0, 10**9), monthly=AMOUNTS, tiers=TIER_LISTS)
def test_tier_reached_exactly_when_spent_is_that_share_of_the_budget(
    spent: int, monthly: int, tiers: list[int]
) -> None:
    warnings = bu.warning_tiers(tiers)
    share = Fraction(spent, monthly) * 100
    expected = max((t for t in (*warnings, 100) if share >= t), default=0)
    assert bu.reached(spent, monthly, warnings) == expected
    assert bu.percent(spent, monthly) == int(share)  # rounded down, never up
    assert bu.state_of(expected) == (
        "Exceeded" if spent >= monthly else "Warning" if expected else "Ok"
    )


@settings(max_examples=300)
@given(
    monthly=AMOUNTS,
    tiers=TIER_LISTS,
    months=st.lists(st.lists(st.integers(0, 2 * 10**9), max_size=12), min_size=1, max_size=4),
)
def test_each_tier_is_notified_once_per_month_and_a_jump_sends_the_highest(
    monthly: int, tiers: list[int], months: list[list[int]]
) -> None:
    """Oracle: in a month, a notice goes out exactly when the highest tier reached so far
    grows, for that tier; spending that falls (a refund) and rises again sends nothing
    twice; a new month starts from nothing."""
    warnings = bu.warning_tiers(tiers)
    scope = bu.Scope(None, monthly)
    for spent_seq in months:
        notified, best, sent = 0, 0, []
        for spent in spent_seq:
            reading = bu.read(scope, spent, warnings, notified)
            tier = max((t for t in (*warnings, 100) if spent * 100 >= t * monthly), default=0)
            expect = tier if tier > best else None
            best = max(best, tier)
            assert reading.due == expect
            if reading.due is not None:
                sent.append(reading.due)
            notified = reading.notified
        assert sent == sorted(set(sent))  # each tier once, rising
        assert notified == best


def test_a_jump_over_two_tiers_sends_only_the_highest() -> None:
    scope = bu.Scope(None, 333_33)  # 333.33: tiers fall on fractions of a fen
    warnings = bu.warning_tiers([50, 80, 100])
    half = bu.read(scope, 166_66, warnings, 0)  # 49.99...%: nothing
    assert (half.due, half.state, half.percent) == (None, "Ok", 49)
    jump = bu.read(scope, 266_67, warnings, 0)  # 80.0006%: straight past 50 to 80
    assert (jump.due, jump.notified, jump.state) == (80, 80, "Warning")
    again = bu.read(scope, 270_00, warnings, jump.notified)
    assert again.due is None
    over = bu.read(scope, 333_33, warnings, again.notified)  # exactly the budget
    assert (over.due, over.state, over.percent) == (100, "Exceeded", 100)


@given(
    spent=st.integers(0, 10**9),
    monthly=AMOUNTS,
    cost=st.fractions(min_value=0, max_value=10**8),
)
def test_start_refused_exactly_when_spent_plus_cost_exceeds_the_budget(
    spent: int, monthly: int, cost: Fraction
) -> None:
    scope = bu.Scope("team-a", monthly)
    month = bu.month_of(datetime(2026, 1, 5, tzinfo=UTC))
    why = bu.start_refusal(scope, "acme", spent, cost, "CNY", month, "one hour of team-a/x")
    assert (why is not None) == (cost > 0 and spent + cost > monthly)
    if why is not None:
        assert "namespace 'team-a' of account 'acme'" in why and "2026-01" in why


def test_start_refusal_names_account_budget_spent_and_cost() -> None:
    month = bu.month_of(datetime(2026, 1, 5, tzinfo=UTC))
    hour = Fraction(982)  # 9.80/h A100 + 50 GiB x 0.0004/h
    why = bu.start_refusal(bu.Scope(None, 33_33), "acme", 25_00, hour, "CNY", month, "one hour")
    assert why == (
        "the budget of account 'acme' would be exceeded: spent 25.00 CNY of 33.33 CNY in "
        "2026-01, and one hour adds 9.82 CNY; raise spec.budget or wait for the next month"
    )
    # exactly reaching the budget is allowed; a paid package term adds nothing
    assert bu.start_refusal(bu.Scope(None, 34_82), "a", 25_00, hour, "CNY", month, "x") is None
    assert bu.start_refusal(bu.Scope(None, 1), "a", 9_00, Fraction(0), "CNY", month, "x") is None


def test_scopes_parse_amounts_in_the_account_currency() -> None:
    budget = Budget.model_validate(
        {"monthly": "100.50", "namespaces": [{"namespace": "a", "monthly": "20"}]}
    )
    assert bu.scopes(budget, "CNY") == [bu.Scope(None, 100_50), bu.Scope("a", 20_00)]
    with pytest.raises(BillingError, match=r"spec\.budget\.monthly"):
        bu.scopes(budget, "JPY")  # 100.50 yen is finer than a yen
    assert bu.scopes(None, "CNY") == []


def test_the_spec_model_refuses_bad_budgets_naming_the_field() -> None:
    base = {"namespaces": ["a"]}
    for budget, words in [
        ({}, "spec.budget.monthly: set monthly, namespaces, or both"),
        ({"monthly": "0"}, "spec.budget.monthly"),
        ({"monthly": "10.123"}, "must not be finer than the currency's minor unit"),
        (
            {"namespaces": [{"namespace": "b", "monthly": "5"}]},
            "spec.budget.namespaces: each budget.namespaces[].namespace must be one of "
            "spec.namespaces",
        ),
        ({"monthly": "5", "notifyAtPercent": [0]}, "spec.budget.notifyAtPercent[0]"),
        ({"monthly": "5", "enforcement": "Stop"}, "spec.budget.enforcement"),
    ]:
        with pytest.raises(SpecError) as err:
            parse(AccountSpec, {**base, "budget": budget})
        assert words in str(err.value), str(err.value)
    spec = parse(AccountSpec, {**base, "budget": {"monthly": "5"}})
    assert spec.budget is not None
    assert (spec.budget.notify_at_percent, spec.budget.enforcement) == (
        [50, 80, 100],
        "RefuseStarts",
    )


def test_runway_tiers_and_the_deprecated_single_field() -> None:
    assert parse(AccountSpec, {"namespaces": ["a"]}).runway_tiers() == (24, 3, 1)
    old = parse(AccountSpec, {"namespaces": ["a"], "lowBalanceWarningHours": 12})
    assert old.runway_tiers() == (12,)
    both = {"namespaces": ["a"], "lowBalanceWarningHours": 12, "runwayNoticeHours": [2, 48]}
    assert parse(AccountSpec, both).runway_tiers() == (48, 2)  # the new field wins


HOURS = st.one_of(st.none(), st.decimals(0, 100, places=2, allow_nan=False))


@settings(max_examples=300)
@given(
    tiers=st.lists(st.integers(1, 72), min_size=1, max_size=5, unique=True),
    steps=st.lists(st.tuples(HOURS, st.booleans()), max_size=25),
)
def test_runway_notices_once_per_tier_per_episode(
    tiers: list[int], steps: list[tuple[Decimal | None, bool]]
) -> None:
    """Oracle: an episode runs while the runway is below the largest tier; in it, a tier
    is sent when it is the lowest crossed and lower than every tier sent before; nothing
    while in arrears; an episode's end forgets what was sent."""
    noticed: int | None = None
    sent_in_episode: set[int] = set()
    for hours, arrears in steps:
        after, due = ar.runway_notice(hours, tiers, noticed, arrears)
        if hours is None or hours >= max(tiers):
            assert (after, due) == (None, None)
            sent_in_episode = set()
        elif arrears:
            assert (after, due) == (noticed, None)
        else:
            lowest = min(t for t in tiers if hours < t)
            fresh = all(lowest < s for s in sent_in_episode)
            assert due == (lowest if fresh else None)
            if due is not None:
                assert due not in sent_in_episode
                sent_in_episode.add(due)
            assert after == min(sent_in_episode, default=None)
        noticed = after


def test_a_runway_episode_24_3_1_then_a_recharge() -> None:
    tiers = (24, 3, 1)
    noticed, sent = None, []
    for hours in ("30", "23.5", "20", "2.9", "2.5", "5", "2", "0.5", "0.2", "40", "10"):
        noticed, due = ar.runway_notice(Decimal(hours), tiers, noticed, False)
        sent.append(due)
    # 24 once, 3 once (not again after a small top-up to 5 h), 1 once; 40 h ends the
    # episode (a recharge), and 10 h starts a new one
    assert sent == [None, 24, None, 3, None, None, None, 1, None, None, 24]
    assert ar.runway_notice(None, tiers, 1, False) == (None, None)  # nothing burns
    with pytest.raises(ValueError, match="runwayNoticeHours"):
        ar.runway_notice(Decimal(1), (), None, False)


def test_budget_month_rollover_is_a_new_start() -> None:
    scope = bu.Scope(None, 100_00)
    warnings = bu.warning_tiers([50, 80, 100])
    december = bu.read(scope, 150_00, warnings, 0)
    assert december.notified == 100
    # the caller passes 0 for a month the status does not show: each tier again
    january = bu.read(scope, 60_00, warnings, 0)
    assert (january.due, january.state) == (50, "Warning")
    assert bu.month_of(datetime(2026, 1, 1, tzinfo=UTC) - timedelta(seconds=1)).month == 12
