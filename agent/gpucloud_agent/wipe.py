"""Wipes: the agent removes node-local folders the operator asked the ledger to remove
(an instance volume deleted after 7 days of arrears, a deleted Image; docs/arrears.md).

Every ``interval_s`` it first makes the node's pending image copies (``imagecopy``, in
the same thread: a copy of a deleted Image is finished before its wipe is looked at),
then fetches ``GET {api}/v1/nodes/{node}/wipes``, and for each one checks that the path
is ``instances/<ns>/<name>`` or ``images/<ns>/<name>`` with no symlink anywhere on it
(and that it resolves inside that folder), measures what it holds, removes it and reports
``POST .../wipes/{id}/done {"bytes_freed": N}``. A path that is missing counts as
already gone (0 bytes): a wipe killed after the removal repeats only the report. A
refused path is logged and counted, never removed, and stays pending for a human.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpucloud_agent.disk import used_bytes
from gpucloud_agent.exposition import Family
from gpucloud_agent.httpclient import HttpClient, HTTPError
from gpucloud_agent.metrics import counter_by_result

if TYPE_CHECKING:
    from gpucloud_agent.imagecopy import ImageCopier

log = logging.getLogger(__name__)
RESULTS = ("wiped", "missing", "refused", "error")
WIPE_FOLDERS = ("instances", "images")


class Refused(ValueError):
    """A wipe path the agent will not touch."""


def resolve(
    disk_root: str | os.PathLike[str], path: str, folders: tuple[str, ...] = ("instances",)
) -> Path:
    """The real path of ``path`` (relative to ``disk_root``), which must be a volume
    folder ``<disk-root>/<folder>/<ns>/<name>`` (``folder`` one of ``folders``) reached
    without any symlink (a link inside instances/ could lead to another tenant's folder);
    anything else raises Refused. Hidden names (``.x``: work folders) are refused too."""
    if not path or os.path.isabs(path):
        raise Refused(f"path {path!r}: must be relative to the data root")
    parts = Path(path).parts
    if (
        len(parts) != 3
        or parts[0] not in folders
        or {".", ".."} & set(parts)
        or any(p.startswith(".") for p in parts)
    ):
        raise Refused(f"path {path!r}: must be {'|'.join(folders)}/<namespace>/<name>")
    for depth in range(1, 4):
        step = os.path.join(disk_root, *parts[:depth])
        if os.path.islink(step):
            raise Refused(f"path {path!r}: {os.path.join(*parts[:depth])!r} is a symlink")
    base = os.path.realpath(os.path.join(disk_root, parts[0]))
    target = os.path.realpath(os.path.join(disk_root, path))
    inside = os.path.commonpath([base, target]) == base
    if not inside or len(Path(os.path.relpath(target, base)).parts) != 2:
        raise Refused(
            f"path {path!r} resolves to {target!r}, not a folder <namespace>/<name> inside {base!r}"
        )
    return Path(target)


def remove(target: Path) -> int | None:
    """Remove ``target``; the bytes it held (measured first), None if it was gone."""
    try:
        freed = used_bytes(target)
    except FileNotFoundError:
        return None
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    except FileNotFoundError:
        pass  # removed meanwhile
    return freed


class Wiper:
    def __init__(
        self,
        node: str,
        api_url: str,
        disk_root: str,
        client: HttpClient,
        headers: Callable[[], dict[str, str]],
        interval_s: float = 30.0,
        copier: ImageCopier | None = None,
        folders: tuple[str, ...] = WIPE_FOLDERS,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"--wipe-interval: must be > 0 seconds, got {interval_s}")
        self.node = node
        self.url = f"{api_url.rstrip('/')}/v1/nodes/{node}/wipes"
        self.disk_root = disk_root
        self.client = client
        self.headers = headers
        self.interval_s = interval_s
        self.copier = copier
        self.folders = folders  # only the kinds of folder this agent holds
        self.counts = dict.fromkeys(RESULTS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _count(self, result: str) -> None:
        with self._lock:
            self.counts[result] += 1

    def run_once(self) -> int:
        """Handle every pending wipe; how many were reported done."""
        resp = self.client.get(self.url, headers=self.headers())
        if resp.status_code != 200:
            raise RuntimeError(f"GET {self.url}: HTTP {resp.status_code}: {resp.text[:200]}")
        return sum(self.wipe(w) for w in resp.json()["wipes"])

    def wipe(self, w: dict[str, Any]) -> bool:
        try:
            target = resolve(self.disk_root, w["path"], self.folders)
        except Refused as exc:
            log.error("wipe %s (%s) refused: %s", w["id"], w["subject"], exc)
            self._count("refused")
            return False
        try:
            removed = remove(target)
        except OSError as exc:  # e.g. a file it may not remove: retried next round
            log.error("wipe %s (%s): removing %s failed: %s", w["id"], w["subject"], target, exc)
            self._count("error")
            return False
        freed = removed or 0
        resp = self.client.post(
            f"{self.url}/{w['id']}/done", json={"bytes_freed": freed}, headers=self.headers()
        )
        if resp.status_code != 200:
            log.warning("wipe %s: report failed: HTTP %s %s", w["id"], resp.status_code, resp.text)
            self._count("error")
            return False
        self._count("missing" if removed is None else "wiped")
        log.info("wiped %s (%s): %d bytes freed", target, w["subject"], freed)
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            if self.copier is not None:
                try:
                    self.copier.run_once()
                except (HTTPError, RuntimeError, KeyError, ValueError) as exc:
                    log.warning("image copies of node %s: %s", self.node, exc)
                    self.copier.count("error")
            try:
                self.run_once()
            except (HTTPError, RuntimeError, OSError, KeyError, ValueError) as exc:
                log.warning("wipes of node %s: %s", self.node, exc)
                self._count("error")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


class WipeCollector:
    """The ``gpucloud_agent_wipes_total{result}`` counter."""

    def __init__(self, wiper: Wiper) -> None:
        self.wiper = wiper

    def __call__(self) -> list[Family]:
        with self.wiper._lock:
            counts = {r: self.wiper.counts[r] for r in RESULTS}
        return [
            counter_by_result(
                "gpucloud_agent_wipes",
                "Wipes of node-local folders the operator requested, by result.",
                counts,
            )
        ]
