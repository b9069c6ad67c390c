"""Disk consumption of instance volumes, cloud disks and images.

Bytes used are allocated blocks (st_blocks * 512, what `du` reports), found by an
iterative `os.scandir` walk that does not follow symlinks, counts a hard-linked file
once, and does not cross into other filesystems mounted below a volume.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpucloud.usage_rules import UsageKind

# <root>/<folder>/<namespace>/<name>
LAYOUT: dict[UsageKind, str] = {
    UsageKind.INSTANCE_VOLUME: "instances",
    UsageKind.CLOUD_DISK: "disks",
    UsageKind.IMAGE: "images",
}


def used_bytes(path: str | os.PathLike[str]) -> int:
    root = os.lstat(path)
    total = root.st_blocks * 512
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(path)] if os.path.isdir(path) and not os.path.islink(path) else []
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except (PermissionError, FileNotFoundError):
            continue  # vanished or unreadable while walking: count what we can see
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                if entry.is_dir(follow_symlinks=False):
                    if st.st_dev != root.st_dev:
                        continue  # a mount point: another filesystem, billed on its own
                    stack.append(entry.path)
                total += st.st_blocks * 512
    return total


@dataclass(frozen=True)
class Volume:
    kind: UsageKind
    namespace: str
    name: str
    path: Path

    @property
    def volume_id(self) -> str:
        return f"{self.namespace}/{self.name}"


def _visible_dirs(path: Path) -> list[Path]:
    # hidden names are work folders (an image copy in progress), never a volume: Kubernetes
    # names cannot start with a dot
    return sorted(
        p
        for p in path.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


def discover(
    root: str | os.PathLike[str], kinds: Iterable[UsageKind] = tuple(LAYOUT)
) -> list[Volume]:
    out: list[Volume] = []
    for kind in kinds:
        folder = LAYOUT[kind]
        base = Path(root) / folder
        if not base.is_dir():
            continue
        for ns in _visible_dirs(base):
            for vol in _visible_dirs(ns):
                out.append(Volume(kind, ns.name, vol.name, vol))
    return out


def measure(
    root: str | os.PathLike[str], kinds: Iterable[UsageKind] = tuple(LAYOUT)
) -> dict[Volume, int]:
    return {v: used_bytes(v.path) for v in discover(root, kinds)}


def parse_kinds(text: str) -> frozenset[UsageKind]:
    """``instances,disks,images`` (folder names) -> the kinds metered; ValueError names
    the flag and what it accepts."""
    by_folder = {folder: kind for kind, folder in LAYOUT.items()}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_folder]
    if unknown or not names:
        raise ValueError(f"--disk-kinds: {text!r} must be a comma list of {', '.join(by_folder)}")
    return frozenset(by_folder[n] for n in names)
