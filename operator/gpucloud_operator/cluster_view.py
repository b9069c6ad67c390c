"""A table of every object of one kind, kept from the watch the operator already runs.

Account passes, placement and admission ask "which instances does this account run",
"which GPUs are held on that node", every few seconds each. Answering them with a list
from the API server decoded every GPUInstance of the cluster per question (45 % of the
operator's idle CPU at 500 instances, docs/benchmarks.md). ``ClusterView`` answers them
from memory instead: Kopf's watch events and this process's own writes feed it, and a
list from the API server fills it on first use and again every ``resync_s``.

Rules (the concurrency of this room):

- Every method may be called from any thread; one lock guards the table, never held
  while calling the API server.
- An object replaces the row of its key (namespace, name) only if its resourceVersion
  is newer (both numeric: etcd's revision; otherwise the later arrival wins). Events and
  our own patch answers arrive out of order, and an older one must not undo a newer one.
- A deletion leaves a tombstone with its version so that a late event of the deleted
  object does not bring it back; tombstones go at the next resync.
- A resync lists at collection version R: rows older than or at R that the list lacks
  were deleted (any object existing at R is in the list); rows newer than R came from
  events after the list and stay. One thread resyncs at a time; the others read the
  table as it is meanwhile. Only the first fill makes readers wait.
- Rows are the API server's JSON less ``metadata.managedFields`` (nobody reads them and
  they are a third of an object), shared by every reader: read-only. Copy to change.
  A view may keep less (``row``): the pods' view keeps only what its one reader reads
  (``pod_row``), as a pod's JSON is mostly spec and status nobody here reads again.
- Staleness: an event is applied when Kopf delivers it (usually milliseconds; while a
  handler of the same object runs, after it); this process's own writes at once. The
  lists this replaces were up to 2 s old.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str]
# load() -> (items, the list's collection resourceVersion)
Loader = Callable[[], tuple[list[Obj], str]]


def _key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _version(obj: Obj) -> str:
    return str(obj["metadata"].get("resourceVersion") or "")


def slim(obj: Obj) -> Obj:
    """``obj`` less ``metadata.managedFields`` (the server-side apply bookkeeping: a
    third of an object, read by nobody here), sharing the rest."""
    meta = obj["metadata"]
    if "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


# What ``InstanceReconciler._observe_running`` (through ``Kube.seen_pod``) reads of a
# pod: its run label, uid, node and phase; name, namespace and version key the row.
POD_META = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")


def pod_row(pod: Obj) -> Obj:
    """The pods' view's row: ``POD_META`` of the metadata, ``spec.nodeName`` and
    ``status.phase`` (about a tenth of a pod's JSON; 2,000 of them were tens of MiB)."""
    meta = pod.get("metadata") or {}
    row: Obj = {"metadata": {k: meta[k] for k in POD_META if k in meta}}
    node = (pod.get("spec") or {}).get("nodeName")
    row["spec"] = {"nodeName": node} if node else {}
    phase = (pod.get("status") or {}).get("phase")
    row["status"] = {"phase": phase} if phase else {}
    return row


def newer(candidate: str, current: str) -> bool:
    """Whether version ``candidate`` is after ``current`` (equal is not after). Kubernetes
    calls versions opaque; etcd's are revisions, compared as numbers. Anything else is
    taken as newer: the later arrival wins, as it would without this check."""
    if candidate.isdigit() and current.isdigit():
        return int(candidate) > int(current)
    return candidate != current


class ClusterView:
    def __init__(
        self,
        plural: str,
        load: Loader,
        resync_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        row: Callable[[Obj], Obj] = slim,
    ) -> None:
        self.plural = plural
        self._load = load
        self._row = row  # what a row keeps of an object
        self._resync_s = resync_s
        self._monotonic = monotonic
        self._lock = threading.Lock()  # the table
        self._loading = threading.Lock()  # one list at a time
        self._rows: dict[Key, tuple[str, Obj]] = {}
        self._tombs: dict[Key, str] = {}
        self._snapshot: list[Obj] | None = None
        self._synced_at: float | None = None  # None: never filled

    # -- feeding ---------------------------------------------------------------------
    def saw(self, obj: Obj) -> None:
        """An object as an event or a write's answer showed it."""
        key, version = _key(obj), _version(obj)
        with self._lock:
            self._put(key, version, obj)

    def gone(self, obj: Obj) -> None:
        """A DELETED event (its body is the object's last state)."""
        key, version = _key(obj), _version(obj)
        with self._lock:
            row = self._rows.get(key)
            if row is not None and not newer(version, row[0]) and version != row[0]:
                return  # the row is a newer object of that name (deleted, then made again)
            self._rows.pop(key, None)
            self._tombs[key] = version
            self._snapshot = None

    def _put(self, key: Key, version: str, obj: Obj) -> bool:
        """Under ``_lock``."""
        tomb = self._tombs.get(key)
        if tomb is not None:
            if not newer(version, tomb):
                return False  # a late event of a deleted object
            del self._tombs[key]
        row = self._rows.get(key)
        if row is not None and not newer(version, row[0]):
            return False
        self._rows[key] = (version, self._row(obj))
        self._snapshot = None
        return True

    # -- reading ---------------------------------------------------------------------
    def objects(self) -> list[Obj]:
        """Every object of the kind, as last seen (a list of its own; rows shared)."""
        self._refresh()
        with self._lock:
            if self._snapshot is None:
                self._snapshot = [obj for _, obj in self._rows.values()]
            return list(self._snapshot)

    def get(self, namespace: str | None, name: str) -> Obj | None:
        """One object as last seen, or None if the table has none of that name."""
        self._refresh()
        with self._lock:
            row = self._rows.get((namespace or "", name))
        return None if row is None else row[1]

    def _refresh(self) -> None:
        synced = self._synced_at
        if synced is not None and self._monotonic() - synced < self._resync_s:
            return
        if synced is None:  # the first fill: every reader waits for it
            with self._loading:
                if self._synced_at is None:
                    self._resync()
            return
        if self._loading.acquire(blocking=False):  # a resync: one thread, others read on
            try:
                if self._synced_at == synced:
                    self._resync()
            finally:
                self._loading.release()

    def _resync(self) -> None:
        """Under ``_loading``: list, then merge by the rules of the module docstring."""
        started = self._monotonic()
        items, listed_at = self._load()
        listed = {_key(o) for o in items}
        with self._lock:
            for obj in items:
                self._put(_key(obj), _version(obj), obj)
            for key in [k for k in self._rows if k not in listed]:
                if listed_at.isdigit() and not newer(self._rows[key][0], listed_at):
                    del self._rows[key]
            self._tombs = {
                k: v
                for k, v in self._tombs.items()
                if listed_at.isdigit() and v.isdigit() and newer(v, listed_at)
            }
            self._snapshot = None
            self._synced_at = started
