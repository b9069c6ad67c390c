from __future__ import annotations

import os
from pathlib import Path

from gpucloud_agent.disk import discover, measure, used_bytes

from gpucloud.usage import UsageKind

MIB = 1 << 20


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_counts_allocated_blocks_of_files_and_dirs(tmp_path: Path) -> None:
    vol = tmp_path / "v"
    write(vol / "a.bin", 3 * MIB)
    write(vol / "sub" / "deeper" / "b.bin", MIB + 1)
    expected = sum(blocks(p) for p in [vol, *vol.rglob("*")])
    assert used_bytes(vol) == expected
    assert 4 * MIB < expected < 4 * MIB + 256 * 1024


def test_symlinks_are_not_followed_and_hardlinks_count_once(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    write(outside, 8 * MIB)
    vol = tmp_path / "v"
    write(vol / "data.bin", MIB)
    (vol / "link").symlink_to(outside)
    (vol / "dirlink").symlink_to(tmp_path)
    os.link(vol / "data.bin", vol / "data2.bin")
    assert used_bytes(vol) < 2 * MIB


def test_sparse_files_count_what_is_allocated(tmp_path: Path) -> None:
    vol = tmp_path / "v"
    vol.mkdir()
    with open(vol / "sparse", "wb") as f:
        f.truncate(100 * MIB)
    assert used_bytes(vol) < MIB


def test_layout_discovery_and_measure(tmp_path: Path) -> None:
    write(tmp_path / "instances" / "team-a" / "inst1" / "x", MIB)
    write(tmp_path / "disks" / "team-a" / "d1" / "y", 2 * MIB)
    write(tmp_path / "images" / "team-b" / "img" / "z", 3 * MIB)
    (tmp_path / "disks" / "stray-file").write_text("not a namespace")
    found = {(v.kind, v.volume_id): n for v, n in measure(tmp_path).items()}
    assert set(found) == {
        (UsageKind.INSTANCE_VOLUME, "team-a/inst1"),
        (UsageKind.CLOUD_DISK, "team-a/d1"),
        (UsageKind.IMAGE, "team-b/img"),
    }
    assert 2 * MIB <= found[(UsageKind.CLOUD_DISK, "team-a/d1")] < 2 * MIB + 64 * 1024
    assert discover(tmp_path / "missing") == []
