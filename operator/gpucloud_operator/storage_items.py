"""CloudDisk and Image reconciliation: data folders, ledger meters, arrears deletion.

Both kinds are billed every hour by the *used* capacity the agent measures (the seed,
3.2 and 3.3): the operator opens one ledger meter per object, kind ``cloud_disk`` or
``image``, subject = the volume id ``<namespace>/<name>`` the agent reports, priced per
GiB-hour at the PriceBook's ``cloudDiskPerGBHour`` / ``imagePerGBHour``; the ledger rates
the agent's byte-second usage against it. Data lives on a node's disk root
(``OperatorConfig.data_root``): ``disks/<ns>/<name>`` and ``images/<ns>/<name>``, the
layout the agent walks.

An Image is a copy of its source instance's data folder, which is node-local (a hostPath
volume on the node that ran it): the operator records an image copy in the ledger for
that node (``request_image_copy``), and the node's agent copies the folder (a hidden
partial folder renamed into place, so a killed agent never leaves a half image) and
reports the bytes the image uses. Only then is the Image Ready, with ``usedBytes`` from
that report and its meter opened from the copy's completion. Deleting an Image (or its
deletion after arrears) cancels a pending copy and asks the same agent to remove the
folder (``request_wipe``). The operator never touches an image folder itself.

A CloudDisk also gets a ReadWriteMany PersistentVolume and a claim in its namespace
(``builders.build_disk_pv``/``build_disk_pvc``); it is Ready once the claim is bound,
and its deletion waits while an active instance has it attached. Its ``usedBytes`` is
the operator's own measurement of the folder (shared storage the operator mounts).
Charges always come from the agent's usage records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from gpucloud import ownership
from gpucloud.billing import PriceBookError
from gpucloud.clock import Clock
from gpucloud.crd import SpecError, parse
from gpucloud.crd.pricebook import price_book
from gpucloud.crd.storageitems import CloudDiskSpec, ImageSpec
from gpucloud.ledger import ImageCopy, Ledger, NotFound
from gpucloud_operator import arrears as ar
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.currency import account_currency, mismatch
from gpucloud_operator.instances import KubeAPI

log = logging.getLogger("gpucloud.operator.storage")
Obj = dict[str, Any]

KINDS = {
    # plural: (meter kind, folder under the data root, kind name)
    "clouddisks": ("cloud_disk", "disks", "CloudDisk"),
    "images": ("image", "images", "Image"),
}
SPECS: dict[str, type[CloudDiskSpec] | type[ImageSpec]] = {
    "clouddisks": CloudDiskSpec,
    "images": ImageSpec,
}


def _disk(obj: Obj) -> CloudDiskSpec:
    return parse(CloudDiskSpec, obj.get("spec"))


def _image(obj: Obj) -> ImageSpec:
    return parse(ImageSpec, obj.get("spec"))


def du(path: Path) -> int:
    """Allocated bytes under ``path`` (no symlinks followed), as ``du`` counts them."""
    if not path.exists():
        return 0
    total = path.lstat().st_blocks * 512
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


class StorageItems:
    def __init__(self, kube: KubeAPI, ledger: Ledger, clock: Clock, cfg: OperatorConfig) -> None:
        self.kube, self.ledger, self.clock, self.cfg = kube, ledger, clock, cfg
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def folder(self, plural: str, namespace: str, name: str) -> Path:
        return Path(self.cfg.data_root) / KINDS[plural][1] / namespace / name

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks[uid]

    # -- entry points ---------------------------------------------------------------
    def reconcile(self, plural: str, obj: Obj) -> None:
        meta = obj["metadata"]
        with self._lock(meta["uid"]):
            fresh = self.kube.get_namespaced_object(plural, meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                return
            if fresh["metadata"].get("deletionTimestamp"):
                return  # the delete handler owns it
            self._reconcile(plural, fresh)

    def delete(self, plural: str, obj: Obj) -> bool:
        """The object is being deleted: close its meter now, remove its volume and data.
        False (call again later) while a cloud disk is attached to an active instance:
        the finalizer holds the deletion, and a condition says why."""
        meta = obj["metadata"]
        with self._lock(meta["uid"]):
            now = r.second(self.clock.now())
            if plural == "clouddisks":
                users = self.users(obj)
                if users:
                    self._hold(obj, users, now)
                    return False
                self.kube.delete_pvc(meta["namespace"], b.disk_pvc_name(meta["name"]))
                self.kube.delete_pv(b.disk_pv_name(meta["uid"]))
            self._close(obj, now)
            if plural == "images":
                self._drop_image(obj, "the Image was deleted", now)
            else:
                self._drop_disk(obj, now)
            return True

    def users(self, disk: Obj) -> list[str]:
        """Active instances the disk is attached to: listed in their spec.cloudDisks, or
        mounted by their current pod (the spec may have changed since it started)."""
        ns, name = disk["metadata"]["namespace"], disk["metadata"]["name"]
        claim = b.disk_pvc_name(name)
        out = []
        for inst in self.kube.list_cluster_objects("gpuinstances"):
            im = inst["metadata"]
            if im["namespace"] != ns or (inst.get("status") or {}).get("phase") not in (
                r.ACTIVE_PHASES
            ):
                continue
            if name in ((inst.get("spec") or {}).get("cloudDisks") or []):
                out.append(im["name"])
                continue
            pod = self.kube.get_pod(ns, b.pod_name(im["name"])) or {}
            volumes = (pod.get("spec") or {}).get("volumes") or []
            if any(
                (v.get("persistentVolumeClaim") or {}).get("claimName") == claim for v in volumes
            ):
                out.append(im["name"])
        return sorted(out)

    def _hold(self, obj: Obj, users: list[str], now: datetime) -> None:
        names = ", ".join(f"{obj['metadata']['namespace']}/{u}" for u in users)
        msg = (
            f"deletion held: attached to active instance(s) {names} (spec.cloudDisks); "
            "stop them and the deletion completes"
        )
        if (obj.get("status") or {}).get("message") == msg:
            return
        self._status(
            "clouddisks",
            obj,
            {"message": msg, **self._cond(obj, "DeletionHeld", True, "InUse", msg, now)},
        )
        self.kube.event(obj, "Warning", "DeletionHeld", msg)

    # -- the pass -------------------------------------------------------------------
    def _account(self, namespace: str) -> Obj | None:
        return ownership.account_for(self.kube.list_cluster_objects("accounts", ttl=2.0), namespace)

    def _status(self, plural: str, obj: Obj, changes: Obj) -> None:
        status = obj.setdefault("status", {})
        changes = {k: v for k, v in changes.items() if status.get(k) != v}
        if changes:
            meta = obj["metadata"]
            self.kube.patch_status(plural, meta["namespace"], meta["name"], changes)
            for k, v in changes.items():
                if v is None:
                    status.pop(k, None)
                else:
                    status[k] = v

    def _cond(self, obj: Obj, type_: str, ok: bool, reason: str, msg: str, now: datetime) -> Obj:
        cond = b.condition(type_, ok, reason, msg, r.fmt(now))
        return {
            "conditions": b.merge_conditions((obj.get("status") or {}).get("conditions"), [cond])
        }

    def _fail(self, plural: str, obj: Obj, reason: str, msg: str, now: datetime) -> None:
        if (obj.get("status") or {}).get("message") == msg:
            return
        self._status(
            plural,
            obj,
            {
                "phase": "Failed",
                "message": msg,
                **self._cond(obj, "Ready", False, reason, msg, now),
            },
        )
        self.kube.event(obj, "Warning", reason, msg)

    def _reconcile(self, plural: str, obj: Obj) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        ns, name = meta["namespace"], meta["name"]
        now = r.second(self.clock.now())
        if status.get("phase") == "Deleted":
            return
        try:
            parse(SPECS[plural], obj.get("spec"))
        except SpecError as exc:
            self._fail(plural, obj, "InvalidSpec", str(exc), now)
            return
        acct = self._account(ns)
        if acct is None:
            self._fail(plural, obj, "NoAccount", f"no Account lists namespace {ns!r}", now)
            return
        account = acct["metadata"]["name"]
        ast = acct.get("status") or {}
        deletion_at = r.parse(ast.get("dataDeletionAt"))
        if (
            ast.get("state") == "Arrears"
            and deletion_at is not None
            and now >= deletion_at
            and ar.deletion_confirmed(self.kube, self.ledger, account, now)
        ):
            self._delete_data(plural, obj, account, deletion_at)
            return
        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is None:
            self._fail(
                plural, obj, "NoPriceBook", f"PriceBook {self.cfg.pricebook!r} is missing", now
            )
            return
        try:
            pb = price_book(pb_obj)
        except PriceBookError as exc:
            self._fail(plural, obj, "InvalidPriceBook", str(exc), now)
            return
        currency = account_currency(self.ledger, acct)
        if currency is None:
            msg = f"Account {account!r} has a spec the models refuse"
            self._fail(plural, obj, "InvalidAccount", msg, now)
            return
        if wrong := mismatch(account, currency, self.cfg.pricebook, pb.currency):
            self._fail(plural, obj, "CurrencyMismatch", wrong, now)
            return
        folder = self.folder(plural, ns, name)
        bound, start, node = True, now, None
        if plural == "images":
            copy = self._make_image(obj, account, now)
            if copy is None:
                return
            used = copy.bytes_used or 0  # the agent's measurement of the finished copy
            start = r.second(copy.done_at or now)  # the image exists from then
            node = copy.node or None  # only that node's agent may report its usage
        else:
            folder.mkdir(parents=True, exist_ok=True)
            bound = self._claim(obj)
            used = du(folder)
        since = r.parse((obj.get("status") or {}).get("billedSince"))
        if since is None:
            since = start
            self._status(plural, obj, {"billedSince": r.fmt(since)})  # persisted first
        self.ledger.ensure_account(account, currency)
        price = (
            pb.storage.cloud_disk_per_gb_hour
            if plural == "clouddisks"
            else pb.storage.image_per_gb_hour
        )
        if plural == "clouddisks":
            node = self.cfg.disk_meter_node or None  # shared storage: one agent meters it
        meter = self._open(obj, plural, account, Decimal(price), since, self._cap(obj, used), node)
        changes: Obj = {
            "phase": "Ready",
            "account": account,
            "meterId": meter,
            "volumeId": f"{ns}/{name}",
            "usedBytes": used,
            "message": f"{used} bytes used, billed per GiB-hour used",
            "observedGeneration": meta.get("generation"),
        }
        cond = ("Ready", True, "Ready", "data available")
        if plural == "clouddisks":
            claim = b.disk_pvc_name(name)
            changes["claimName"] = claim
            cap = _disk(obj).capacity_gi * 2**30
            if used > cap:
                cond = ("Ready", False, "OverCapacity", f"{used} bytes used > capacity {cap}")
            elif not bound:
                cond = ("Ready", False, "ClaimPending", f"waiting for claim {claim} to bind")
            else:
                cond = ("Ready", True, "Ready", f"data available; attach as claim {claim}")
        if (obj.get("status") or {}).get("phase") != "Ready":
            self.kube.event(
                obj, "Normal", "Ready", f"{KINDS[plural][2]} ready, billing from {r.fmt(since)}"
            )
        self._status(plural, obj, {**changes, **self._cond(obj, *cond, now)})

    def _claim(self, disk: Obj) -> bool:
        """The disk's ReadWriteMany volume and the tenant's claim on it; True once bound."""
        meta = disk["metadata"]
        claim = b.disk_pvc_name(meta["name"])
        if self.kube.pvc_bound(meta["namespace"], claim):
            return True
        pv = b.build_disk_pv(
            disk,
            data_root=self.cfg.data_root,
            nfs_server=self.cfg.disk_nfs_server,
            nfs_path=self.cfg.disk_nfs_path,
        )
        self.kube.ensure_pv(pv)
        self.kube.ensure_pvc(b.build_disk_pvc(disk))
        return self.kube.pvc_bound(meta["namespace"], claim)

    @staticmethod
    def _cap(obj: Obj, used: int) -> int:
        """The most bytes the agent may report for the volume (gpucloud.ledger.admission):
        a cloud disk's capacity; an image, a copy made once, its size when made (whole
        GiB up, so the agent's block count of the same files always fits)."""
        if "capacityGi" in obj.get("spec", {}):
            return _disk(obj).capacity_gi * 2**30
        made = int((obj.get("status") or {}).get("usedBytes") or used)
        return max(1, -(-made // 2**30)) * 2**30

    def _open(
        self,
        obj: Obj,
        plural: str,
        account: str,
        price: Decimal,
        since: datetime,
        cap: int,
        node: str | None = None,
    ) -> str:
        meta = obj["metadata"]
        meter_id = f"{KINDS[plural][0]}:{meta['uid']}"
        volume = f"{meta['namespace']}/{meta['name']}"
        self.ledger.open_meter(
            meter_id,
            account=account,
            resource=volume,
            kind=KINDS[plural][0],
            subject=volume,
            unit_price=price,
            unit="gb_hour",
            opened_at=since,
            memo=f"{KINDS[plural][2]} {volume}, per GiB-hour used",
            max_bytes=cap,
            node=node,
        )
        return meter_id

    def _close(self, obj: Obj, at: datetime) -> None:
        meter = (obj.get("status") or {}).get("meterId")
        if meter:
            with contextlib.suppress(NotFound):  # never opened: nothing to close
                self.ledger.close_meter(meter, at)

    # -- images: copied and removed by the agent of the node holding the data ----------
    @staticmethod
    def _copy_subject(image: Obj) -> str:
        return f"image:{image['metadata']['uid']}"

    def _data_node(self, inst: Obj) -> str | None:
        """The node holding the instance's data folder: the node its volume was placed on
        (status.volumeNode), else its local volume's node affinity; None if never placed."""
        node = (inst.get("status") or {}).get("volumeNode")
        if node:
            return str(node)
        pv = self.kube.get_pv(b.pv_name(inst["metadata"]["uid"])) or {}
        affinity = ((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}
        for term in affinity.get("nodeSelectorTerms") or []:
            for expr in term.get("matchExpressions") or []:
                if expr.get("key") == "kubernetes.io/hostname" and expr.get("values"):
                    return str(expr["values"][0])
        return None

    def _make_image(self, obj: Obj, account: str, now: datetime) -> ImageCopy | None:
        """The finished copy of the source instance's data; None while it is requested but
        not made yet, or when it cannot be made (the Image then says why)."""
        meta, status = obj["metadata"], obj.get("status") or {}
        ns, name, source = meta["namespace"], meta["name"], _image(obj).source_instance
        copy = self.ledger.get_image_copy(self._copy_subject(obj))
        if copy is None and status.get("phase") == "Ready":
            # made by an operator that still copied on its own disk: that measurement stands
            made = r.parse(status.get("billedSince")) or now
            used = int(status.get("usedBytes") or 0)
            return ImageCopy(0, "", "", "", "", account, made, made, "copied", used, None)
        if copy is None:
            copy = self._request_copy(obj, account, now)
            if copy is None:
                return None
        if copy.outcome is None:
            msg = f"waiting for the agent of node {copy.node!r} to copy {copy.source}"
            self._status(
                "images",
                obj,
                {
                    "phase": "Creating",
                    "node": copy.node,
                    "message": msg,
                    **self._cond(obj, "Ready", False, "Copying", msg, now),
                },
            )
            return None
        if copy.outcome != "copied":
            msg = (
                f"spec.sourceInstance: the agent of node {copy.node!r} could not copy "
                f"{copy.source} ({copy.outcome}): {copy.message}"
            )
            self._fail("images", obj, "CopyFailed", msg, now)
            return None
        if not status.get("readyAt"):
            done = r.second(copy.done_at or now)
            self._status("images", obj, {"readyAt": r.fmt(done), "node": copy.node})
            self.kube.event(
                obj,
                "Normal",
                "ImageCreated",
                f"backup of {ns}/{source} copied to images/{ns}/{name} on node {copy.node} "
                f"({copy.bytes_used} bytes)",
            )
        return copy

    def _request_copy(self, obj: Obj, account: str, now: datetime) -> ImageCopy | None:
        meta, source = obj["metadata"], _image(obj).source_instance
        ns, name = meta["namespace"], meta["name"]
        inst = self.kube.get_namespaced_object("gpuinstances", ns, source)
        if inst is None:
            self._fail(
                "images",
                obj,
                "SourceNotFound",
                f"spec.sourceInstance: GPUInstance {source!r} not found in {ns!r}",
                now,
            )
            return None
        node = self._data_node(inst)
        if node is None:
            self._fail(
                "images",
                obj,
                "NoSourceData",
                f"spec.sourceInstance: {source!r} has no data (deleted, or never placed)",
                now,
            )
            return None
        path = f"images/{ns}/{name}"
        wiping = self.ledger.pending_wipe_at(path)
        if wiping is not None:  # an earlier Image of this name: its folder goes first
            msg = (
                f"waiting for the agent of node {wiping.node!r} to remove the folder of a "
                f"deleted image of the same name ({wiping.subject})"
            )
            self._status("images", obj, {"phase": "Creating", "message": msg})
            return None
        self._status("images", obj, {"sourceUID": inst["metadata"]["uid"], "node": node})
        return self.ledger.request_image_copy(
            node, f"instances/{ns}/{source}", path, self._copy_subject(obj), account, now
        )

    def _drop_image(self, obj: Obj, reason: str, at: datetime) -> str | None:
        """Cancel a pending copy, then ask the agent of its node to remove the folder (in
        that order: the agent finishes a copy before it looks at the wipes, so the wipe
        always comes after the copy it undoes). The node, None if none was asked."""
        subject = self._copy_subject(obj)
        copy = self.ledger.cancel_image_copy(subject, reason, at)
        if copy is None:
            return None
        self.ledger.request_wipe(copy.node, copy.path, subject, copy.account, at)
        return copy.node

    def _drop_disk(self, disk: Obj, at: datetime) -> str | None:
        """Remove a cloud disk's folder. With a shared-storage meter (``disk_meter_node``)
        that agent removes it, as node agents remove node-local folders: tenants' files
        may be anyone's, and only an agent holds the capabilities to remove them. Without
        one (the single-host test bed) the operator removes it from its own mount.
        The node asked, None if the operator removed it."""
        meta = disk["metadata"]
        node = self.cfg.disk_meter_node
        account = (disk.get("status") or {}).get("account")
        if not node or not account:
            shutil.rmtree(self.folder("clouddisks", meta["namespace"], meta["name"]), True)
            return None
        path = f"disks/{meta['namespace']}/{meta['name']}"
        self.ledger.request_wipe(node, path, f"cloud_disk:{meta['uid']}", account, at)
        return node

    def _delete_data(self, plural: str, obj: Obj, account: str, at: datetime) -> None:
        meta = obj["metadata"]
        folder = self.folder(plural, meta["namespace"], meta["name"])
        self._close(obj, at)
        node = None
        if plural == "clouddisks":  # the instances were shut down by the arrears
            self.kube.delete_pvc(meta["namespace"], b.disk_pvc_name(meta["name"]))
            self.kube.delete_pv(b.disk_pv_name(meta["uid"]))
            node = self._drop_disk(obj, at)
        else:
            node = self._drop_image(obj, "deleted after the arrears retention period", at)
        volume = f"{meta['namespace']}/{meta['name']}"
        self.ledger.record_audit(
            account,
            "gpucloud-operator",
            "data.deleted",
            f"{KINDS[plural][0]}:{volume}",
            {"kind": KINDS[plural][0], "resource": volume, "path": str(folder), "node": node},
            at,
        )
        msg = f"{KINDS[plural][2]} data deleted at {r.fmt(at)} after the arrears retention period"
        self._status(
            plural,
            obj,
            {
                "phase": "Deleted",
                "usedBytes": 0,
                "message": msg,
                "dataDeletedAt": r.fmt(at),
                **self._cond(obj, "Ready", False, "DataDeleted", msg, at),
            },
        )
        self.kube.event(obj, "Warning", "DataDeleted", msg)
