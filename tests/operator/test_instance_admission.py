"""Admission's pure rules (gpucloud_operator.instances.admission): the one-hour rule on
the available balance, the reservations counted once, the instance limit. The
reconciler-level tests of the same rules are in test_one_hour_rule.py and
test_reconciler.py; these pin the rules themselves, figure by figure."""

from __future__ import annotations

import pytest
import yaml
from gpucloud_operator import rules as r
from gpucloud_operator.instances.admission import (
    count_active,
    instance_limit_refusal,
    reserved_by_others,
    start_decision,
)
from opworld import ROOT

from gpucloud.crd.pricebook import price_book
from gpucloud.ledger import Unposted

A100 = "NVIDIA-A100-SXM4-80GB"
PB = price_book(yaml.safe_load((ROOT / "examples/pricebook.yaml").read_text()))


def decide(balance: int, key: str, *, open_: int = 0, closed: int = 0, reserved: int = 0):
    return start_decision(
        balance,
        Unposted(open_minor=open_, closed_minor=closed),
        reserved,
        pb=PB,
        product=A100,
        count=2,
        key=key,
        quota_gib=50,
    )


# examples/pricebook.yaml. One hour of 2 x A100 pay-as-you-go with a 50 GiB quota:
# 2 x 9.80 + 50 x 0.0004 = 19.62 CNY = 1962 fen; spot: 2 x 4.90 + 0.02 = 9.82 CNY = 982
# fen; a day package: 2 x 210.00 = 420.00 CNY.
@pytest.mark.parametrize(
    ("key", "hour"), [("PayAsYouGo", 1962), ("Spot", 982)], ids=["payg", "spot"]
)
def test_one_hour_rule_needs_strictly_more_than_the_hour(key: str, hour: int) -> None:
    assert not decide(hour, key).allowed  # equal is refused (the seed: "greater than")
    assert decide(hour + 1, key).allowed
    assert decide(hour + 1, key).needed_minor == hour + 1


@pytest.mark.parametrize(
    "deduction",
    [{"open_": 1}, {"closed": 1}, {"reserved": 1}],
    ids=["accrued-by-running", "owed-by-stopped", "reserved-by-admissions"],
)
def test_every_deduction_counts_against_the_hour(deduction: dict[str, int]) -> None:
    assert decide(1963, "PayAsYouGo").allowed
    refused = decide(1963, "PayAsYouGo", **deduction)
    assert not refused.allowed
    assert refused.available_minor == 1962


def test_a_package_start_needs_the_term_not_the_hour() -> None:
    assert decide(42000, "Package/Day").allowed  # covering the term is enough
    assert not decide(41999, "Package/Day").allowed
    assert not decide(42000, "Package/Day", reserved=1).allowed
    assert decide(42000, "Package/Day").needed_minor == 42000


def res(minor: int, phase: str = "Pending") -> r.Reservation:
    return r.Reservation(minor, f"package:{minor}:1", phase)


def test_reservations_are_counted_once_and_never_the_starting_instance() -> None:
    mine = {"me": ("acct", 100), "a": ("acct", 10), "other-acct": ("elsewhere", 1000)}
    listed = {"me": res(100), "a": res(10), "b": res(20)}  # "a" is also mine: once
    assert reserved_by_others("me", "acct", mine, {}, listed) == 10 + 20


def test_a_listed_admission_this_process_saw_move_on_is_not_reserved() -> None:
    listed = {"b": res(20, "Pending"), "c": res(30, "Starting"), "d": res(40, "Running")}
    # "b" was charged (Running) after the list was read; "c" is still admitted here;
    # "d" is a renewal due (listed with its current phase): reserved whatever we know
    phases = {"b": ("ns", "Running"), "c": ("ns", "Starting"), "d": ("ns", "Running")}
    assert reserved_by_others("me", "acct", {}, phases, listed) == 30 + 40
    assert reserved_by_others("me", "acct", {}, {}, listed) == 20 + 30 + 40


def test_instance_limit_counts_active_phases_of_the_accounts_namespaces_only() -> None:
    phases = {
        "me": ("team", "Pending"),  # the one starting: not counted against itself
        "p": ("team", "Pending"),
        "s": ("team", "Starting"),
        "r": ("team", "Running"),
        "x": ("team", "Stopping"),
        "stopped": ("team", "Stopped"),
        "refused": ("team", "Refused"),
        "preempted": ("team", "Preempted"),
        "elsewhere": ("other", "Running"),
    }
    assert count_active(phases, {"team"}, "me") == 4
    assert count_active(phases, {"team", "other"}, "me") == 5
    assert instance_limit_refusal("acct", 3, 4) is None
    refusal = instance_limit_refusal("acct", 4, 4)
    assert refusal == "account 'acct' already runs 4 instance(s); its instanceLimit is 4"
