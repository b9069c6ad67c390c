"""The agent's wipe loop against the real API: it removes only instance folders of its
own node, reports the bytes freed, and refuses any path outside <disk-root>/instances."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpucloud_agent.httpclient import HttpClient
from gpucloud_agent.main import build_parser
from gpucloud_agent.wipe import Refused, WipeCollector, Wiper, resolve

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.ledger import Ledger, open_ledger

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_resolve_accepts_only_instance_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "instances/ns/job").mkdir(parents=True)
    (root / "disks/ns/d").mkdir(parents=True)
    (root / "instances/ns/evil").symlink_to(root / "disks/ns/d")
    (root / "instances/ns/up").symlink_to(tmp_path)
    assert resolve(root, "instances/ns/job") == (root / "instances/ns/job").resolve()
    assert resolve(root, "instances/ns/gone") == (root / "instances/ns/gone").resolve()
    for bad in (
        str(root / "instances/ns/job"),  # absolute
        "",
        "instances/../disks/ns/d",
        "instances/ns/evil",  # a symlink out of instances/
        "instances/ns/up/x",
        "instances/ns",  # a whole namespace
        "instances",
        "disks/ns/d",
        "instances/ns/job/sub",
    ):
        with pytest.raises(Refused):
            resolve(root, bad)


def test_resolve_refuses_any_symlink_on_the_path(tmp_path: Path) -> None:
    """instances/ns1/link -> ../ns2/inst2 resolves inside instances/ and has the right
    depth, but wiping it would remove another tenant's folder (issue 16, finding 9)."""
    root = tmp_path / "root"
    (root / "instances/ns2/inst2").mkdir(parents=True)
    (root / "instances/ns1").mkdir(parents=True)
    (root / "instances/ns1/link").symlink_to("../ns2/inst2")
    (root / "instances/alias").symlink_to("ns2")  # a symlinked namespace
    for path in ("instances/ns1/link", "instances/alias/inst2", "instances/ns1/../ns2/inst2"):
        with pytest.raises(Refused):
            resolve(root, path)
    assert resolve(root, "instances/ns2/inst2") == (root / "instances/ns2/inst2").resolve()


def test_wipe_interval_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).wipe_interval == 30.0
    monkeypatch.setenv("GPUCLOUD_AGENT_WIPE_INTERVAL", "2.5")
    assert build_parser().parse_args([]).wipe_interval == 2.5
    assert build_parser().parse_args(["--wipe-interval", "7"]).wipe_interval == 7.0
    with pytest.raises(ValueError, match="--wipe-interval: must be > 0"):
        Wiper("n", "http://x", "/d", HttpClient(), dict, interval_s=0)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ApiProcess, Ledger]]:
    proc = ApiProcess(tmp_path / "api", nodes=["node-a", "node-b"]).start()
    ledger = open_ledger(proc.database_url)
    ledger.ensure_account("acme")
    try:
        yield proc, ledger
    finally:
        ledger.close()
        proc.stop()


def test_wiper_removes_its_nodes_folders_and_reports(
    tmp_path: Path, api: tuple[ApiProcess, Ledger]
) -> None:
    proc, ledger = api
    root = tmp_path / "data"
    job = root / "instances/ns/job"
    (job / "ckpt").mkdir(parents=True)
    (job / "ckpt/model.pt").write_bytes(os.urandom(300_000))
    other = root / "instances/ns/other"  # node-b's (same path layout on every node)
    other.mkdir(parents=True)
    (root / "disks/ns/d").mkdir(parents=True)
    (root / "disks/ns/d/keep").write_bytes(b"k")
    (root / "instances/ns/link").symlink_to(root / "disks/ns/d")
    ledger.request_wipe("node-a", "instances/ns/job", "s-job", "acme", T0)
    ledger.request_wipe("node-a", "instances/ns/gone", "s-gone", "acme", T0)
    ledger.request_wipe("node-a", "instances/ns/link", "s-link", "acme", T0)
    ledger.request_wipe("node-b", "instances/ns/other", "s-other", "acme", T0)
    token = {"Authorization": f"Bearer {agent_token('node-a')}"}
    client = HttpClient(timeout_s=10)
    try:
        wiper = Wiper("node-a", proc.url, str(root), client, lambda: token, interval_s=0.1)
        assert wiper.run_once() == 2
        assert not job.exists() and other.exists()
        assert (root / "disks/ns/d/keep").read_bytes() == b"k"  # the symlink was refused
        done = ledger.get_wipe("s-job")
        assert done is not None and done.done_at is not None
        assert done.bytes_freed is not None and done.bytes_freed >= 300_000
        gone = ledger.get_wipe("s-gone")
        assert gone is not None and gone.bytes_freed == 0
        assert [w.subject for w in ledger.pending_wipes("node-a")] == ["s-link"]
        assert ledger.get_wipe("s-other").done_at is None  # type: ignore[union-attr]
        # the refused one is retried (and refused again) on the next round, nothing else
        assert wiper.run_once() == 0
        assert wiper.counts == {"wiped": 1, "missing": 1, "refused": 2, "error": 0}
        samples = {
            dict(labels)["result"]: value
            for family in WipeCollector(wiper)()
            for _, labels, value in family.samples
        }
        assert samples["wiped"] == 1 and samples["refused"] == 2
        # a token of another node gets nothing
        bad = Wiper("node-a", proc.url, str(root), client, lambda: {"Authorization": "Bearer x"})
        with pytest.raises(RuntimeError, match="HTTP 401"):
            bad.run_once()
    finally:
        client.close()
    audit = [a.action for a in ledger.audit_events("acme")]
    assert audit.count("data.wiped") == 2 and audit.count("data.wipe_requested") == 4
