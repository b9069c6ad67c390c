"""The shared-storage meter: the agent process with no GPUs (``--nvml none``) metering
only the cloud disks under its root (``--disk-kinds disks``), as the chart runs it, and
node agents that leave shared disks to it (``--disk-kinds instances,images``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from agent_testkit import AgentProcess, Receiver, free_port, wait_for
from gpucloud_agent.disk import discover, parse_kinds
from gpucloud_agent.wipe import Refused, resolve

from gpucloud.clock import FileClock
from gpucloud.usage import UsageKind

REPORTER = "gpucloud-shared-storage"


def _tree(root: Path) -> None:
    for folder in ("instances", "disks", "images"):
        (root / folder / "team" / "v").mkdir(parents=True)
        (root / folder / "team" / "v" / "f").write_bytes(b"x" * 50_000)
    (root / "disks" / ".gpucloud-storage-meter" / "wal").mkdir(parents=True)  # its WAL


def test_disk_kinds_choose_the_folders_metered(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert {v.kind for v in discover(tmp_path, parse_kinds("disks"))} == {UsageKind.CLOUD_DISK}
    node = {v.kind for v in discover(tmp_path, parse_kinds("instances,images"))}
    assert node == {UsageKind.INSTANCE_VOLUME, UsageKind.IMAGE}
    assert len(discover(tmp_path)) == 3  # the test bed's single host: everything
    with pytest.raises(ValueError, match=r"--disk-kinds: 'disks,gpus' must be a comma list"):
        parse_kinds("disks,gpus")
    # what a meter may wipe follows what it meters
    assert resolve(tmp_path, "disks/team/v", ("disks",)) == (tmp_path / "disks/team/v")
    with pytest.raises(Refused):
        resolve(tmp_path, "instances/team/v", ("disks",))


def test_the_storage_meter_reports_only_disks_under_its_name(tmp_path: Path) -> None:
    """No GPUs and no pod-resources socket: ready anyway, and at the end of the hour it
    reports the cloud disk (not the instance volume or image beside it) as the reporter."""
    root = tmp_path / "shared"
    _tree(root)
    clock = FileClock(tmp_path / "clock")
    hour = 1_800_000_000 // 3600 * 3600
    clock.set(datetime.fromtimestamp(hour + 10, UTC))
    receiver = Receiver()
    agent = AgentProcess(
        [
            "--node-name", REPORTER, "--nvml", "none", "--disk-kinds", "disks",
            "--pod-uid-source", "derived", "--pod-resources-socket", str(tmp_path / "none.sock"),
            "--api-url", receiver.url, "--token-file", str(tmp_path / "none"),
            "--wal-dir", str(root / "disks/.gpucloud-storage-meter/wal"),
            "--disk-root", str(root), "--disk-metrics-interval", "0.2",
            "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
            "--sample-period", "0.2",
        ],
        {"GPUCLOUD_CLOCK": f"file:{clock.path}"},
        tmp_path / "agent.log",
    )  # fmt: skip
    agent.start()
    try:
        agent.wait_ready()
        wait_for(lambda: agent.state()["disk_cursor"] == hour, 30, "the first hour")
        clock.set(datetime.fromtimestamp(hour + 3600 + 1, UTC))
        records = wait_for(receiver.snapshot, 30, "the hour's disk record")
        assert [(r["kind"], r["volume"], r["node"], r["start"]) for r in records] == [
            ("cloud_disk", "team/v", REPORTER, hour)
        ]
        assert records[0]["quantity"] >= 50_000
    finally:
        agent.stop()
        receiver.close()
