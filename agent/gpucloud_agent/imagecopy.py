"""Image copies: the agent copies an instance's node-local folder into an image folder,
because only the node that ran the instance holds its data (docs/operator.md, "Images").

``run_once`` fetches ``GET {api}/v1/nodes/{node}/image-copies``; for each copy it checks
``source`` = ``instances/<ns>/<name>`` and ``path`` = ``images/<ns>/<image>`` (same
namespace, no symlink on either path, see ``wipe.resolve``), copies the source into a
hidden ``images/<ns>/.<image>.partial`` and renames it into place, measures the image
folder and reports ``POST .../image-copies/{id}/done {"bytes_used": N}``. A killed agent
leaves at most the partial folder, which the next attempt removes and redoes; a copy
renamed before the kill is only measured and reported again. A missing source or a
refused path is reported ``failed``: the Image fails rather than waiting forever.

The copy never follows a symlink (the tenant owns everything inside the source folder):
directories are opened with ``O_NOFOLLOW`` relative to their parent's descriptor,
symlinks are copied as links, regular files opened ``O_NOFOLLOW | O_NONBLOCK`` and
checked with ``fstat``; FIFOs, sockets and device nodes are skipped, and set-user-ID,
set-group-ID bits are dropped (the agent writes the copy as root).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpucloud_agent.disk import used_bytes
from gpucloud_agent.exposition import Family
from gpucloud_agent.httpclient import HttpClient
from gpucloud_agent.metrics import counter_by_result
from gpucloud_agent.wipe import Refused, resolve

log = logging.getLogger(__name__)
RESULTS = ("copied", "failed", "error")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SourceMissing(FileNotFoundError):
    """The instance folder to copy is not on this node."""


def _copy_dir(src_fd: int, dst: str) -> None:
    """Copy the directory open at ``src_fd`` into the existing directory ``dst``."""
    with os.scandir(src_fd) as it:
        entries = list(it)
    for entry in entries:
        name, target = entry.name, os.path.join(dst, entry.name)
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while copying: not part of the image
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), target)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=src_fd)
            try:
                os.mkdir(target, 0o700)
                _copy_dir(fd, target)
                os.chmod(target, stat.S_IMODE(os.fstat(fd).st_mode) & 0o1777)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src_fd, name, target)
        else:
            log.info("image copy: skipped %s (not a file, directory or symlink)", target)


def _copy_file(src_fd: int, name: str, target: str) -> None:
    fd = os.open(name, FILE_FLAGS, dir_fd=src_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped since the scan
            return
        with (
            os.fdopen(fd, "rb", closefd=False) as src,
            open(target, "xb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW, 0o600)) as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(target, stat.S_IMODE(st.st_mode) & 0o777)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def make_image(disk_root: str | os.PathLike[str], source: str, path: str) -> int:
    """Copy ``source`` into ``path`` (both relative to ``disk_root``) once; the bytes the
    image folder uses. Raises Refused for a path it will not touch, SourceMissing when
    the instance folder is not here."""
    src = resolve(disk_root, source, ("instances",))
    dst = resolve(disk_root, path, ("images",))
    if Path(source).parts[1] != Path(path).parts[1]:
        raise Refused(f"path {path!r}: not in the namespace of {source!r}")
    if dst.is_dir():
        return used_bytes(dst)  # renamed before a kill: only the report was missing
    if not src.is_dir():
        raise SourceMissing(f"source {source!r}: no such folder on this node")
    dst.parent.mkdir(parents=True, exist_ok=True)
    resolve(disk_root, path, ("images",))  # the namespace folder made is no symlink
    partial = dst.with_name(f".{dst.name}.partial")
    if partial.is_symlink() or partial.is_file():
        partial.unlink()
    shutil.rmtree(partial, ignore_errors=True)  # a killed attempt's half copy
    src_fd = os.open(src, DIR_FLAGS)
    try:
        os.mkdir(partial, 0o700)
        _copy_dir(src_fd, str(partial))
        os.chmod(partial, stat.S_IMODE(os.fstat(src_fd).st_mode) & 0o1777)
    finally:
        os.close(src_fd)
    os.rename(partial, dst)  # atomic: the image is whole or absent
    return used_bytes(dst)


class ImageCopier:
    def __init__(
        self,
        node: str,
        api_url: str,
        disk_root: str,
        client: HttpClient,
        headers: Callable[[], dict[str, str]],
    ) -> None:
        self.node = node
        self.url = f"{api_url.rstrip('/')}/v1/nodes/{node}/image-copies"
        self.disk_root = disk_root
        self.client = client
        self.headers = headers
        self.counts = dict.fromkeys(RESULTS, 0)
        self.lock = threading.Lock()

    def count(self, result: str) -> None:
        with self.lock:
            self.counts[result] += 1

    def run_once(self) -> int:
        """Make every pending copy; how many were reported (done or failed)."""
        resp = self.client.get(self.url, headers=self.headers())
        if resp.status_code != 200:
            raise RuntimeError(f"GET {self.url}: HTTP {resp.status_code}: {resp.text[:200]}")
        return sum(self.copy(c) for c in resp.json()["image_copies"])

    def copy(self, c: dict[str, Any]) -> bool:
        try:
            used = make_image(self.disk_root, str(c["source"]), str(c["path"]))
        except (Refused, SourceMissing) as exc:
            log.error("image copy %s (%s) failed: %s", c["id"], c["subject"], exc)
            return self._report(c, "failed", {"message": str(exc)[:1024]})
        except OSError as exc:  # e.g. disk full: retried next round from scratch
            log.error("image copy %s (%s): %s", c["id"], c["subject"], exc)
            self.count("error")
            return False
        log.info("image %s copied from %s: %d bytes", c["path"], c["source"], used)
        return self._report(c, "done", {"bytes_used": used})

    def _report(self, c: dict[str, Any], what: str, body: dict[str, Any]) -> bool:
        resp = self.client.post(f"{self.url}/{c['id']}/{what}", json=body, headers=self.headers())
        if resp.status_code != 200:
            log.warning(
                "image copy %s: report failed: HTTP %s %s", c["id"], resp.status_code, resp.text
            )
            self.count("error")
            return False
        self.count("copied" if what == "done" else "failed")
        return True


class ImageCopyCollector:
    """The ``gpucloud_agent_image_copies_total{result}`` counter."""

    def __init__(self, copier: ImageCopier) -> None:
        self.copier = copier

    def __call__(self) -> list[Family]:
        with self.copier.lock:
            counts = {r: self.copier.counts[r] for r in RESULTS}
        return [
            counter_by_result(
                "gpucloud_agent_image_copies",
                "Image copies the operator requested of this node, by result.",
                counts,
            )
        ]
