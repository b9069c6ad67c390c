"""The agent's image copies: the copy itself (no symlink followed, no special file, no
set-user-ID bit, hidden partial folder renamed into place) and a real agent process
killed with SIGKILL in the middle of a copy, then run again against the real API."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agent_testkit import AgentProcess, wait_for
from gpucloud_agent.disk import discover, used_bytes
from gpucloud_agent.imagecopy import SourceMissing, make_image
from gpucloud_agent.wipe import Refused

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.ledger import Ledger, open_ledger
from gpucloud.testing.net import free_port

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SRC, DST = "instances/ns/job", "images/ns/job-img"


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a link's target, 'dir' or 'special'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif not p.is_file():
            out[rel] = "special"  # never opened: a FIFO would block the test
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_copy_keeps_files_links_and_modes_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "data"
    src = root / SRC
    (src / "ckpt").mkdir(parents=True)
    (src / "ckpt/model.pt").write_bytes(os.urandom(70_001))
    (src / "notes.txt").write_text("mine\n")
    os.chmod(src / "notes.txt", 0o640)
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o4755)  # as root in the copy it must not stay set-user-ID
    (src / "escape").symlink_to("/etc")  # copied as a link, never followed
    (src / "ckpt/latest").symlink_to("model.pt")
    os.mkfifo(src / "pipe")  # would block a reader forever: skipped
    used = make_image(root, SRC, DST)
    img = root / DST
    assert used == used_bytes(img) and used >= 70_001
    expected = {k: v for k, v in tree(src).items() if k != "pipe"}
    assert tree(img) == expected
    assert (img / "escape").is_symlink() and os.readlink(img / "escape") == "/etc"
    assert stat.S_IMODE((img / "notes.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((img / "suid").stat().st_mode) == 0o755
    assert not (img.parent / ".job-img.partial").exists()
    (src / "notes.txt").write_text("changed")  # a copy, not a link
    assert (img / "notes.txt").read_text() == "mine\n"
    # made already (killed after the rename, before the report): only measured again
    assert make_image(root, SRC, DST) == used and (img / "notes.txt").read_text() == "mine\n"


def test_refused_paths_and_a_missing_source(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "instances/ns/job").mkdir(parents=True)
    (root / "instances/other/secret").mkdir(parents=True)
    (root / "instances/ns/link").symlink_to("../other/secret")
    (root / "images").mkdir()
    (root / "images/evil").symlink_to(root / "instances/other")
    for src, dst in (
        ("instances/ns/link", "images/ns/x"),  # another tenant's folder through a link
        (SRC, "images/evil/x"),  # an image namespace that is a link
        (SRC, "images/other/x"),  # another namespace
        (SRC, "images/ns/.x"),
        ("disks/ns/d", "images/ns/x"),
        ("/etc", "images/ns/x"),
        (SRC, "images/ns/../../instances/ns/x"),
    ):
        with pytest.raises(Refused):
            make_image(root, src, dst)
    assert not (root / "instances/other/x").exists() and not (root / "images/ns").exists()
    with pytest.raises(SourceMissing):
        make_image(root, "instances/ns/gone", "images/ns/x")


def test_a_leftover_partial_is_never_a_volume_and_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / SRC).mkdir(parents=True)
    (root / SRC / "a").write_bytes(b"a" * 5000)
    half = root / "images/ns/.job-img.partial"
    half.mkdir(parents=True)
    (half / "stale").write_bytes(b"half")
    assert [v.volume_id for v in discover(root)] == ["ns/job"]  # the instance only
    make_image(root, SRC, DST)
    assert tree(root / DST) == tree(root / SRC) and not half.exists()


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


def agent(tmp_path: Path, api: ApiProcess, node: str) -> AgentProcess:
    cfg = tmp_path / "nvml.json"
    labels = {"nvidia.com/gpu.product": "NVIDIA-L40S", "nvidia.com/gpu.memory": "46068"}
    cfg.write_text(json.dumps({"node": node, "labels": labels, "capacity": {"nvidia.com/gpu": 1}}))
    token = tmp_path / f"{node}.token"
    token.write_text(agent_token(node))
    return AgentProcess(
        [
            "run", "--node-name", node, "--nvml", "fake", "--fake-config", str(cfg),
            "--pod-uid-source", "derived",
            "--pod-resources-socket", str(tmp_path / "no-pod-resources.sock"),
            "--api-url", api.url, "--token-file", str(token),
            "--wal-dir", str(tmp_path / f"wal-{node}"), "--disk-root", str(tmp_path / "data"),
            "--wipe-interval", "0.2",
            "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
        ],
        {},
        tmp_path / f"agent-{node}.log",
    )  # fmt: skip


def test_agent_killed_mid_copy_leaves_no_image_and_the_rerun_makes_exactly_one(
    tmp_path: Path, api: tuple[ApiProcess, Ledger]
) -> None:
    proc, ledger = api
    root = tmp_path / "data"
    src = root / SRC
    for d in range(40):  # 40 x 40 files of 24 KiB: long enough to be caught mid-way
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(40):
            (src / f"d{d:02}/f{f:02}").write_bytes(os.urandom(24 * 1024))
    (src / "tenant.txt").write_text("mine\n")
    other = ledger.request_image_copy("node-b", SRC, "images/ns/b-img", "image:b", "acme", T0)
    ledger.request_image_copy("node-a", SRC, DST, "image:a", "acme", T0)
    partial, img = root / "images/ns/.job-img.partial", root / DST

    def mid_copy() -> bool:
        assert first.proc is not None and first.proc.poll() is None, first.log.read_text()
        assert not img.exists(), "the copy finished before the test could interrupt it"
        return partial.is_dir() and sum(1 for _ in partial.rglob("f*")) >= 100

    first = agent(tmp_path, proc, "node-a")
    first.start()
    try:
        wait_for(mid_copy, 60, "the agent to be in the middle of the copy")
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind
    assert partial.is_dir() and not img.exists()
    assert "ns/job-img" not in {v.volume_id for v in discover(root)}  # nothing to meter
    pending = ledger.get_image_copy("image:a")
    assert pending is not None and pending.outcome is None  # not reported, not Ready

    second = agent(tmp_path, proc, "node-a")
    second.start()
    try:
        done = wait_for(
            lambda: (c := ledger.get_image_copy("image:a")) and c.outcome and c, 120, "the copy"
        )
    finally:
        second.stop()
    assert done.outcome == "copied" and done.bytes_used == used_bytes(img)
    assert tree(img) == tree(src) and (img / "tenant.txt").read_text() == "mine\n"
    assert sorted(os.listdir(root / "images/ns")) == ["job-img"]  # no partial, one image
    assert [v.volume_id for v in discover(root) if "images" in str(v.path)] == ["ns/job-img"]
    audit = [a.action for a in ledger.audit_events("acme")]
    assert audit.count("image.copied") == 1
    # node-b's copy of the same source was not this agent's to make
    b = ledger.get_image_copy("image:b")
    assert b is not None and b.id == other.id and b.outcome is None
    assert not (root / "images/ns/b-img").exists()
