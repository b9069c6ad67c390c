"""Node wipes: the operator's requests to a node's agent to remove a node-local folder."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ledger_helpers import T0

from gpucloud.ledger import IdempotencyConflict, InvalidInput, Ledger, NotFound, WrongNode

PATH = "instances/acme-research/job"
SUBJECT = "instance-volume:uid-1:1"


@pytest.fixture
def acme(ledger: Ledger) -> Ledger:
    ledger.ensure_account("acme")
    return ledger


def test_request_is_pending_for_its_node_only_and_idempotent_on_subject(acme: Ledger) -> None:
    first = acme.request_wipe("node-a", PATH, SUBJECT, "acme", T0)
    again = acme.request_wipe("node-a", PATH, SUBJECT, "acme", T0 + timedelta(hours=1))
    assert again == first and first.done_at is None and first.requested_at == T0
    assert acme.pending_wipes("node-a") == [first]
    assert acme.pending_wipes("node-b") == []
    assert acme.get_wipe(SUBJECT) == first and acme.get_wipe("other") is None
    assert acme.pending_wipe_at(PATH) == first and acme.pending_wipe_at("instances/x/y") is None
    audit = [a for a in acme.audit_events("acme") if a.action == "data.wipe_requested"]
    assert [(a.subject, a.detail) for a in audit] == [(SUBJECT, {"node": "node-a", "path": PATH})]
    with pytest.raises(IdempotencyConflict, match="node-a"):
        acme.request_wipe("node-b", PATH, SUBJECT, "acme", T0)


def test_complete_marks_done_once_and_refuses_another_node(acme: Ledger) -> None:
    w = acme.request_wipe("node-a", PATH, SUBJECT, "acme", T0)
    with pytest.raises(WrongNode, match="belongs to node 'node-a'"):
        acme.complete_wipe(w.id, "node-b", 10, T0)
    assert acme.pending_wipes("node-a") == [w]
    done = acme.complete_wipe(w.id, "node-a", 10_000, T0 + timedelta(seconds=30))
    assert done.done_at == T0 + timedelta(seconds=30) and done.bytes_freed == 10_000
    # a retried report changes nothing
    assert acme.complete_wipe(w.id, "node-a", 0, T0 + timedelta(minutes=5)) == done
    assert acme.pending_wipes("node-a") == [] and acme.get_wipe(SUBJECT) == done
    assert acme.pending_wipe_at(PATH) is None
    wiped = [a for a in acme.audit_events("acme") if a.action == "data.wiped"]
    assert [(a.actor, a.detail["bytes_freed"]) for a in wiped] == [("node-a", 10_000)]
    # a later request for the same subject returns the finished one, not a new wipe
    assert acme.request_wipe("node-a", PATH, SUBJECT, "acme", T0 + timedelta(days=1)) == done
    with pytest.raises(NotFound, match="wipe 999"):
        acme.complete_wipe(999, "node-a", 0, T0)


@pytest.mark.parametrize(
    ("path", "rule"),
    [("/var/lib/gpucloud/instances/x", "relative"), ("instances/../../etc", "'..'"), ("", "empty")],
)
def test_bad_paths_are_refused(acme: Ledger, path: str, rule: str) -> None:
    with pytest.raises(InvalidInput, match=rf"path: .*{rule}"):
        acme.request_wipe("node-a", path, SUBJECT, "acme", T0)
    assert acme.pending_wipes("node-a") == []


def test_bad_report_and_unknown_account(acme: Ledger) -> None:
    w = acme.request_wipe("node-a", PATH, SUBJECT, "acme", T0)
    with pytest.raises(InvalidInput, match="bytes_freed: must be >= 0"):
        acme.complete_wipe(w.id, "node-a", -1, T0)
    with pytest.raises(NotFound, match="ghost"):
        acme.request_wipe("node-a", PATH, "other", "ghost", T0)
