"""``InstanceReconciler``: the entry points (a watch event, a timer tick, a deletion)
and the rooms it is made of. Each room is a mixin in its own module; they share the
state of ``concurrency.ReconcilerState`` and the steps of ``core.Core``:

=============  ===============================================================
admission      cloud disks, instance limit, the one-hour rule, reservations
placement      the volume's node of a first run
lifecycle      the pass, start, run, stop, release (the phase state machine)
settlement     GPU meters opened, closed, settled; accrued cost shown
packages       terms charged, reminded, renewed, left (mode switches)
preemption     spot notices, their delivery and stops, the resume queue
storage        the volume, hourly storage, deletion of the data
arrears        an instance of an account in arrears
budget         a start refused by a budget; StopPayAsYouGo stops
idle           idle GPUs: status.idleSince, the notice, the opt-in stop
concurrency    the locks and caches, and the rules for them
=============  ===============================================================
"""

from __future__ import annotations

from typing import Any

from gpucloud.clock import monotonic
from gpucloud_operator import builders as b
from gpucloud_operator.cluster_view import slim
from gpucloud_operator.instances.admission import Admission
from gpucloud_operator.instances.arrears import Arrears
from gpucloud_operator.instances.budget import Budgets
from gpucloud_operator.instances.core import Pass
from gpucloud_operator.instances.idle import IdleGPUs
from gpucloud_operator.instances.kubeapi import PLURAL, Obj
from gpucloud_operator.instances.lifecycle import Lifecycle
from gpucloud_operator.instances.packages import Packages
from gpucloud_operator.instances.placement import Placement
from gpucloud_operator.instances.preemption import Preemption
from gpucloud_operator.instances.settlement import Settlement
from gpucloud_operator.instances.storage import Storage
from gpucloud_operator.instances.sweeper import Seen, next_due


class InstanceReconciler(
    Lifecycle,
    Admission,
    Placement,
    Settlement,
    Packages,
    Preemption,
    Storage,
    Arrears,
    Budgets,
    IdleGPUs,
):
    """The GPUInstance reconciler: level-triggered, one pass per event or timer tick.

    State that a posting depends on (run number, meter id, stop and release instants,
    package terms, storage progress) is written to ``status`` *before* the posting, and
    every posting has a key derived from that state, so a pass interrupted anywhere
    (SIGKILL included) repeats the same postings with the same keys on restart: the
    ledger answers "already posted" and nothing is charged twice or lost."""

    # -- entry points ---------------------------------------------------------------
    def reconcile_named(
        self, namespace: str, name: str, uid: str | None = None, **seen: Any
    ) -> None:
        """A pass over the instance ``namespace/name`` (only the incarnation ``uid`` when
        given: then the instance is read once, under its lock). ``seen``: what the event
        that asked for the pass showed (``Pass.pod_seen``, ``Pass.claim_bound``)."""
        if uid is not None:
            self._reconcile_fresh(namespace, name, uid, wait=True, **seen)
            return
        inst = self.kube.get_namespaced_object(PLURAL, namespace, name)
        if inst is not None:
            self.reconcile(inst)

    def reconcile(self, inst: Obj, *, wait: bool = True) -> None:
        """A pass over ``inst`` as it is now. ``wait=False`` (the sweeper's passes): skip
        it when a pass over the instance is already running, rather than hold a worker
        thread on the lock for a pass that repeats it."""
        meta = inst["metadata"]
        # the body stands for a read if it is as fresh (checked under the lock)
        self._reconcile_fresh(meta["namespace"], meta["name"], meta["uid"], wait=wait, body=inst)

    def _reconcile_fresh(
        self,
        namespace: str,
        name: str,
        uid: str,
        *,
        wait: bool,
        body: Obj | None = None,
        **seen: Any,
    ) -> None:
        lock = self._lock(self._locks, uid)
        if not lock.acquire(blocking=False):
            if not wait:
                return
            lock.acquire()
            seen = {}  # another pass ran meanwhile: what the event showed may be out of date
        try:
            # read under the lock: the body of the event may predate the last pass's
            # patches; one of the version the last pass read or left is current
            if body is not None and self._body_current(uid, body):
                # no copy: a pass never changes the body in place (``Pass.status`` is its
                # own dict, and every change is a new value), so a shared row will do
                fresh: Obj | None = slim(body)
            else:
                fresh = self.kube.get_namespaced_object(PLURAL, namespace, name)
            if fresh is None or fresh["metadata"]["uid"] != uid:
                self._unschedule(uid)
                return
            self._saw_version(uid, fresh)
            if fresh["metadata"].get("deletionTimestamp"):
                self._unschedule(uid)
                return  # the release handler owns it now
            p = self._pass(fresh, **seen)
            failed = True
            try:
                self._reconcile(p)
                failed = False
            finally:
                self._schedule(p, failed)  # under the lock: the entry follows the last pass
        finally:
            lock.release()

    def sweep_pass(self, namespace: str, name: str, uid: str, body: Obj | None = None) -> None:
        """The sweeper's pass (``instances/sweeper.py``): skipped when another pass over
        the instance runs (that one sets the next entry). ``body``: the instance as the
        watch-fed table shows it; it stands for a read if it is as fresh."""
        if body is not None and body["metadata"].get("uid") == uid:
            self._reconcile_fresh(namespace, name, uid, wait=False, body=body)
        else:
            self._reconcile_fresh(namespace, name, uid, wait=False)

    def _schedule(self, p: Pass, failed: bool = False) -> None:
        """Tell the sweeper when this instance next needs a pass (``sweeper.next_due``)."""
        if self.sweeper is None:
            return
        running, mono = p.phase == "Running", monotonic()
        policy = p.account_spec.idle if p.account_spec is not None else None
        with self._guard:
            idle = self._idle_checked.get(p.uid)
        idle_applies = policy is not None and running and bool(p.status.get("meterId"))
        cost_left, eager_left = (
            self._shown_left(p.uid, bool(p.status.get("gpus")), mono) if running else (None, None)
        )
        ticket = None if failed else self._ticket(p)
        if ticket is None:
            self._tickets.drop(p.uid)
        else:
            self._tickets.put(p.uid, ticket)
        seen = Seen(
            status=p.status,
            now=p.now,
            in_arrears=bool(p.acct_status.get("arrearsSince")),
            failed=failed,
            idle_checked=(idle or p.now) if idle_applies else None,
            cost_left_s=cost_left,
            eager_left_s=eager_left,
            refreshable=ticket is not None,
        )
        self.sweeper.due(p.uid, p.ns, p.name, next_due(seen, self.cfg, self.idle_check_s))

    def _unschedule(self, uid: str) -> None:
        self._tickets.drop(uid)
        if self.sweeper is not None:
            self.sweeper.forget(uid)

    def pod_changed(self, pod: Obj, deleted: bool) -> None:
        """A pod of an instance changed. Only changes that matter to the instance start
        a pass: the pod ran, ended, vanished, or could not be scheduled."""
        meta = pod.get("metadata") or {}
        name = (meta.get("labels") or {}).get(b.INSTANCE_LABEL)
        owner = next((o["uid"] for o in meta.get("ownerReferences") or []), None)
        if not name:
            return
        phase = (pod.get("status") or {}).get("phase")
        with self._guard:
            known = (self._phases or {}).get(owner or "", ("", ""))[1]
        if not deleted:
            if phase == "Running" and known == "Running":
                return  # nothing new for the instance
            if phase == "Pending":
                conds = (pod.get("status") or {}).get("conditions") or []
                if not any(
                    c.get("type") == "PodScheduled" and c.get("status") == "False" for c in conds
                ):
                    return  # still on its way: the Running event follows
        self.reconcile_named(meta["namespace"], name, owner, pod_seen=None if deleted else pod)

    def claim_changed(self, pvc: Obj, deleted: bool) -> None:
        """An instance's claim changed: once it is bound, the pod waiting for it can be
        created now (the pass that found it unbound asked to be woken up)."""
        meta = pvc.get("metadata") or {}
        name = (meta.get("labels") or {}).get(b.INSTANCE_LABEL)
        owner = next((o["uid"] for o in meta.get("ownerReferences") or []), None)
        if not name or owner is None:
            return
        with self._guard:
            if deleted or (pvc.get("status") or {}).get("phase") != "Bound":
                if deleted:
                    self._awaiting_bind.discard(owner)
                return
            if owner not in self._awaiting_bind:
                return
            self._awaiting_bind.discard(owner)
        self.reconcile_named(meta["namespace"], name, owner, claim_bound=True)

    def release(self, inst: Obj) -> bool:
        """Settle everything, then delete pod, claim and volume. False: not done yet
        (agent usage may still arrive for the last run); call again later."""
        with self._lock(self._locks, inst["metadata"]["uid"]):
            fresh = self.kube.get_namespaced_object(
                PLURAL, inst["metadata"]["namespace"], inst["metadata"]["name"]
            )
            return self._release(self._pass(fresh or inst))
