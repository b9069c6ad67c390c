"""Instance storage: the node-local volume (claim first, then its volume bound to the
claim, the claim nudged while the PV controller lags), hourly settlement of the quota
(an exact running total in status, each window posted under its own key), and the data's
deletion after 7 days of arrears or at release (the agent of the volume's node wipes
the folder; a new volume at the same path waits for it)."""

from __future__ import annotations

import time
from datetime import datetime
from fractions import Fraction

from gpucloud.billing import RunningTotal, minor_exponent
from gpucloud.ledger import EntryKind, IdempotencyConflict
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass, log

_RECHECKS = (1, 1, 1, 2, 4, 8)  # claim checks, in claim_recheck_s: see _nudge_claim


def bind_wait(node: str | None) -> str:
    return f"waiting for the instance volume to bind on {node}"


class Storage(Core):
    """The instance's volume, its storage bill, and the deletion of its data."""

    def _volume_node(self, p: Pass, new: bool) -> tuple[str | None, bool | None]:
        """The node holding the instance's data, chosen (and the volume created) on the
        first placement, and whether its claim is bound (None: not known)."""
        node = p.status.get("volumeNode")
        if node is None:
            with self._placement_lock:
                node = self._place(p)
            if node is None:
                return None, False
        self._patch(p, {"volumeNode": node})
        # a bound claim has its volume (a later run): nothing to create again
        if not new and (p.claim_bound or self.kube.pvc_bound(p.ns, b.pvc_name(p.name))):
            return node, True
        # The claim first, then its volume bound to the claim's uid: the PV controller
        # (20 API requests/s by default, shared by all claims) then only records the
        # binding (3 writes) instead of binding the volume itself (6 or more). A burst of
        # starts waits on those writes.
        claim = self.kube.ensure_pvc(b.build_instance_pvc(p.inst))
        pv = b.build_local_pv(p.inst, node)
        uid = ((claim or {}).get("metadata") or {}).get("uid")
        if uid:
            pv["spec"]["claimRef"]["uid"] = uid
        self.kube.ensure_pv(pv)
        if uid:
            # the PV controller syncs a claim on its own events only (or every 15 s):
            # an update of the claim once its volume exists has it bound at once
            volume = {"gpucloud.dev/volume": pv["metadata"]["name"]}
            self.kube.annotate_pvc(p.ns, b.pvc_name(p.name), volume)
            self._nudge_claim(p.ns, p.name, p.uid)
        if claim is None:
            return node, None
        return node, (claim.get("status") or {}).get("phase") == "Bound"

    def _nudge_claim(self, namespace: str, name: str, uid: str, step: int = 0) -> None:
        """Look again while the claim is unbound (after 1, 1, 1, 2, 4, 8 x
        ``claim_recheck_s``; one chain per instance). The update above makes the PV
        controller sync the claim; when that sync comes before the new volume reaches the
        controller's cache, the claim (which names its volume) waits for the controller's
        next resync, 15 s later: that was the slowest twentieth of a burst of starts.
        The volume's own sync marks it Bound without touching the claim, so a Bound
        volume beside an unbound claim is that case: touch the claim again, then look
        less often (the sync waits in the controller's queue). Otherwise the controller
        is only behind (its client rate), and an update would just add work."""
        if step == 0:
            with self._guard:
                if uid in self._nudging:
                    return  # a chain runs already
                self._nudging.add(uid)

        def again() -> None:
            after = len(_RECHECKS)  # the chain ends unless set below
            try:
                with self._guard:
                    if uid not in self._awaiting_bind:
                        return  # bound (or the instance went away)
                after = step + 1
                pv = self.kube.get_pv(b.pv_name(uid))
                if ((pv or {}).get("status") or {}).get("phase") == "Bound":
                    # a new value each time, or the patch changes nothing and no sync follows
                    touch = {"gpucloud.dev/volume-sync": str(time.monotonic_ns())}
                    self.kube.annotate_pvc(namespace, b.pvc_name(name), touch)
                    after = max(after, _RECHECKS.index(2))
            finally:
                if after < len(_RECHECKS):
                    self._nudge_claim(namespace, name, uid, after)
                else:
                    with self._guard:
                        self._nudging.discard(uid)

        self._later.call(self.claim_recheck_s * _RECHECKS[step], again)

    def _settle_storage(self, p: Pass, final: bool) -> None:
        """Instance storage by quota, one posting per settlement window (clock hours by
        default), running or not, minus the seconds covered by package terms. Only whole
        windows are settled, except the last one at release. The windows add up in a
        ``RunningTotal`` kept in status (``storageExact``, ``storagePostedMinor``): each
        posts the delta of the rounded cumulative totals, so the instance's storage
        postings are its exact storage total rounded once. A pass killed before the patch
        repeats the same windows from the same total: same keys, same amounts."""
        assert p.pb is not None
        since = r.parse(p.status.get("storageSince"))
        if since is None:
            return
        start = r.parse(p.status.get("storageBilledUntil")) or since
        window = self.cfg.storage_settlement_s
        if final:
            until = r.parse(p.status.get("releasedAt")) or p.now
        else:
            ts = int(p.now.timestamp())
            until = datetime.fromtimestamp(ts - ts % window, p.now.tzinfo)
        if until <= start:
            return
        total = RunningTotal.decode(
            p.status.get("storageExact"), p.status.get("storagePostedMinor")
        )
        for a, z in r.storage_windows(start, until, window):
            exact = r.storage_window_exact(p.pb, p.quota, (a, z), p.terms)
            total, amount = total.add(exact, p.pb.currency)
            if amount <= 0:
                continue
            key = f"storage:{p.uid}:{int(a.timestamp())}"
            try:
                self.ledger.post_entry(
                    p.account,
                    EntryKind.CHARGE,
                    -amount,
                    key,
                    resource=p.resource,
                    memo=f"instance storage {p.quota} GiB quota, {r.fmt(a)} -> {r.fmt(z)}",
                    at=p.now,
                    meta={
                        "quota_gib": p.quota,
                        "start": r.fmt(a),
                        "end": r.fmt(z),
                        "exact_total": total.encode(),
                        "posted_total_minor": total.posted_minor,
                    },
                )
            except IdempotencyConflict:
                # posted before with other figures (the price or quota changed between a
                # killed pass and its repeat): the ledger's entry is the record, go on
                # from the total it recorded
                total = self._adopt_storage_entry(p, key, total, amount)
        self._patch(
            p,
            {
                "storageBilledUntil": r.fmt(until),
                "storageExact": total.encode(),
                "storagePostedMinor": total.posted_minor,
            },
        )

    def _adopt_storage_entry(
        self, p: Pass, key: str, total: RunningTotal, amount: int
    ) -> RunningTotal:
        """The running total after a window the ledger already holds under ``key`` with
        other figures than ``amount``: the ledger's entry is the record."""
        entry = self.ledger.get_entry(key)
        log.warning("storage window %s of %s was posted with other figures", key, p.resource)
        if "exact_total" in entry.meta:
            return RunningTotal.decode(entry.meta["exact_total"], entry.meta["posted_total_minor"])
        # posted by an older operator, window by window: keep our exact total, count what
        # was really posted, and never let the total fall below it (no credit follows)
        posted = total.posted_minor - amount - entry.amount_minor
        assert p.pb is not None
        floor = Fraction(posted, 10 ** minor_exponent(p.pb.currency))
        return RunningTotal(max(total.exact, floor), posted)

    def _delete_data(self, p: Pass, at: datetime) -> None:
        """Storage is settled up to ``at`` exactly, then the volume goes: the agent of the
        volume's node is asked (through the ledger) to remove the node-local folder, and
        claim and volume are deleted. DataDeleted stays False (WipePending) until the
        agent reports the folder gone (``_wipe_pending``). Every step is idempotent, so a
        pass killed midway repeats it."""
        saved, p.now = p.now, at
        self._settle_storage(p, final=True)
        p.now = saved
        node = p.status.get("volumeNode") or self._pv_node(p)
        if node:  # before the PV goes: a pass killed after it still finds the node
            self.ledger.request_wipe(
                node, f"instances/{p.ns}/{p.name}", self._wipe_subject(p), p.account, at
            )
        self.kube.delete_pvc(p.ns, b.pvc_name(p.name))
        self.kube.delete_pv(b.pv_name(p.uid))
        message = (
            f"instance storage deleted at {r.fmt(at)} after "
            f"{self.cfg.arrears_retention_s // 3600} h of arrears; waiting for the agent of "
            f"node {node!r} to remove the folder (a start waits for it too)"
        )
        self._patch(
            p,
            {
                "storageSince": None,
                "storageBilledUntil": None,
                "storageExact": None,
                "storagePostedMinor": None,
                "volumeNode": None,
                "message": message,
                "conditions": self._conditions(p, ("DataDeleted", False, "WipePending", message)),
            },
        )
        self._wipe_pending(p, deleted_at=at, node=node)

    def _path_being_wiped(self, p: Pass) -> bool:
        """An instance about to place a new volume where another one's folder (an earlier
        instance of the same name) is still to be wiped waits: True."""
        if p.status.get("volumeNode") or p.phase in r.ACTIVE_PHASES or p.model.state != "Running":
            return False
        other = self.ledger.pending_wipe_at(f"instances/{p.ns}/{p.name}")
        if other is None:
            return False
        self._patch(
            p,
            {
                "message": f"waiting for the agent of node {other.node!r} to remove the "
                f"folder of a deleted volume of the same name ({other.subject})"
            },
        )
        return True

    def _wipe_subject(self, p: Pass) -> str:
        # one volume per run count: a new volume is only ever created by a new run
        return f"instance-volume:{p.uid}:{int(p.status.get('runs') or 0)}"

    def _pv_node(self, p: Pass) -> str | None:
        """The node of the instance's local volume, from its node affinity."""
        pv = self.kube.get_pv(b.pv_name(p.uid)) or {}
        terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get(
            "nodeSelectorTerms"
        ) or []
        for term in terms:
            for expr in term.get("matchExpressions") or []:
                if expr.get("key") == "kubernetes.io/hostname" and expr.get("values"):
                    return str(expr["values"][0])
        return None

    def _wipe_pending(
        self, p: Pass, deleted_at: datetime | None = None, node: str | None = None
    ) -> bool:
        """While the agent has not removed a deleted volume's folder: True (the pass
        stops here, so no new volume is placed at that path). Once it reports the wipe
        done: DataDeleted=True, the event and the audit record."""
        cond = next(
            (c for c in p.status.get("conditions") or [] if c.get("type") == "DataDeleted"), None
        )
        if cond is None or cond.get("reason") != "WipePending":
            return self._path_being_wiped(p)
        wipe = self.ledger.get_wipe(self._wipe_subject(p))
        if wipe is not None and wipe.done_at is None:
            return True
        at = wipe.requested_at if wipe is not None else (deleted_at or p.now)
        freed = (wipe.bytes_freed or 0) if wipe is not None else 0
        where = f" on node {wipe.node}" if wipe is not None else " (no node held it)"
        message = (
            f"instance storage deleted at {r.fmt(at)} after "
            f"{self.cfg.arrears_retention_s // 3600} h of arrears; {freed} bytes freed{where}"
        )
        self.ledger.record_audit(
            p.account,
            "gpucloud-operator",
            "data.deleted",
            f"instance:{p.resource}",
            {
                "kind": "instance_volume",
                "resource": p.resource,
                "path": f"instances/{p.ns}/{p.name}",
                "node": wipe.node if wipe is not None else node,
                "bytes_freed": freed,
            },
            at,
        )
        self._patch(
            p,
            {
                "message": message,
                "conditions": self._conditions(
                    p, ("DataDeleted", True, "ArrearsRetention", message)
                ),
            },
        )
        self._event(p, "Warning", "DataDeleted", message)
        return False
