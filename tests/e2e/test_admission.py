"""The chart's admission policies against a real API server (issue 16, finding 2): a
RechargeReview's reviewer and a Recharge's submitter are the user who creates it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpucloud.testing.testbed import REPO, Testbed

pytestmark = pytest.mark.e2e


@pytest.fixture
def policies(testbed: Testbed, tmp_path: Path) -> Iterator[None]:
    """The chart's admission.yaml, rendered and applied (removed afterwards)."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "chart"))
    from charttools import render

    release = f"adm{uuid.uuid4().hex[:6]}"
    docs = [
        d for d in render(tmp_path, "--show-only", "templates/admission.yaml", release=release) if d
    ]
    assert {d["kind"] for d in docs} == {
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    text = yaml.safe_dump_all(docs)
    testbed.kubectl("apply", "-f", "-", input=text)
    try:
        yield
    finally:
        testbed.kubectl("delete", "-f", "-", "--wait=false", input=text, check=False)


def _review(name: str, reviewer: str | None) -> dict:
    meta: dict = {"name": name}
    if reviewer is not None:
        meta["annotations"] = {"gpucloud.dev/reviewer": reviewer}
    return {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "RechargeReview",
        "metadata": meta,
        "spec": {
            "rechargeRef": {"namespace": "ns", "name": "rc", "uid": "u-1"},
            "amount": "100.00",
            "voucherId": "v-1",
            "decision": "Approve",
        },
    }


def _create_as(tb: Testbed, user: str, doc: dict):  # type: ignore[no-untyped-def]
    return tb.kubectl(
        "create", "-f", "-", "--as", user, "--as-group", "system:masters",
        input=yaml.safe_dump(doc), check=False,
    )  # fmt: skip


def test_the_reviewer_is_the_user_who_creates_the_review(testbed: Testbed, policies: None) -> None:
    name = f"adm-{uuid.uuid4().hex[:8]}"
    # The policy takes a moment to reach the API server's admission chain.
    deadline = time.monotonic() + 60
    while True:
        forged = _create_as(testbed, "mallory", _review(name, "alice"))
        if forged.returncode != 0 or time.monotonic() > deadline:
            break
        testbed.kubectl("delete", "rechargereview", name, "--wait=true", check=False)
        time.sleep(0.5)
    assert forged.returncode != 0 and "mallory" in forged.stderr, forged.stderr
    assert "gpucloud.dev/reviewer" in forged.stderr
    missing = _create_as(testbed, "alice", _review(name, None))
    assert missing.returncode != 0 and "gpucloud.dev/reviewer" in missing.stderr
    own = _create_as(testbed, "alice", _review(name, "alice"))
    assert own.returncode == 0, own.stderr
    try:
        changed = testbed.kubectl(
            "annotate", "rechargereview", name, "--overwrite", "gpucloud.dev/reviewer=bob",
            "--as", "alice", "--as-group", "system:masters", check=False,
        )  # fmt: skip
        assert changed.returncode != 0 and "cannot change" in changed.stderr
    finally:
        testbed.kubectl("delete", "rechargereview", name, "--wait=false", check=False)
