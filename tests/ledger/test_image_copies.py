"""The ledger's image copies: requests validated (layout, same namespace), one per
subject, finished once, by their own node only."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpucloud.ledger import IdempotencyConflict, InvalidInput, Ledger, NotFound, WrongNode

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SRC, DST = "instances/ns/job", "images/ns/job-img"


@pytest.fixture
def led(ledger: Ledger) -> Ledger:
    ledger.ensure_account("acme")
    return ledger


def test_requests_are_checked_and_idempotent(led: Ledger) -> None:
    first = led.request_image_copy("node-a", SRC, DST, "image:u1", "acme", T0)
    assert led.request_image_copy("node-a", SRC, DST, "image:u1", "acme", T0) == first
    with pytest.raises(IdempotencyConflict):
        led.request_image_copy("node-b", SRC, DST, "image:u1", "acme", T0)
    for src, dst in (
        ("instances/ns/job", "images/other/x"),  # another namespace
        ("/instances/ns/job", DST),
        ("instances/ns/../x/job", DST),
        ("disks/ns/job", DST),
        (SRC, "instances/ns/job2"),
        (SRC, "images/ns"),
        (SRC, "images/ns/.hidden"),
        (SRC, "images/ns/a/b"),
    ):
        with pytest.raises(InvalidInput):
            led.request_image_copy("node-a", src, dst, "image:bad", "acme", T0)
    assert led.get_image_copy("image:bad") is None


def test_finished_once_by_its_own_node(led: Ledger) -> None:
    c = led.request_image_copy("node-a", SRC, DST, "image:u1", "acme", T0)
    with pytest.raises(WrongNode):
        led.complete_image_copy(c.id, "node-b", 10, T0)
    with pytest.raises(WrongNode):
        led.fail_image_copy(c.id, "node-b", "no", T0)
    with pytest.raises(NotFound):
        led.complete_image_copy(c.id + 100, "node-a", 10, T0)
    with pytest.raises(InvalidInput):
        led.complete_image_copy(c.id, "node-a", -1, T0)
    assert [p.id for p in led.pending_image_copies("node-a")] == [c.id]
    assert led.pending_image_copies("node-b") == []
    done = led.complete_image_copy(c.id, "node-a", 4097, T0)
    assert (done.outcome, done.bytes_used, done.done_at) == ("copied", 4097, T0)
    assert led.complete_image_copy(c.id, "node-a", 1, T0) == done  # a retried report
    assert led.cancel_image_copy("image:u1", "deleted", T0) == done  # too late to cancel
    assert led.pending_image_copies("node-a") == []
