"""The run lifecycle: one pass moves an instance through its phases.

    (new) --admitted--> Pending --its pod runs--> Running --stop--> Stopping --> final
      +--refused (limit, money, not offered)--> Refused

    final: Stopped (the user, the pod ended, arrears), Expired (package), Preempted
    (spot), Refused (a package term that can no longer be paid). Expired, Preempted and
    an arrears stop stay down until the spec changes (status.haltedGeneration); with
    spec.state Running, a run whose pod ended starts again, and a Refused instance goes
    through admission again (the refusal may no longer hold).
    Running --preempted, spec.spot.resume--> Queued --its node has room--> Pending
    any phase --deletion--> Released (settled first, then pod, claim, volume deleted)

What one pass does, in order: settle closed runs whose grace is over, wait for a folder
being wiped, the arrears rules, hourly storage, finish an interrupted stop; for a running
instance a billing mode switch, a spot notice that ran out, package expiry and renewal;
then what ``next_step`` says for the phase and spec.state. ``next_step`` is the state
machine's table, pure; the mixin carries its steps out."""

from __future__ import annotations

import enum
from datetime import datetime

from gpucloud.billing import BillingError, BillingMode
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.admission import checkpoint_refusal
from gpucloud_operator.instances.core import Core, Pass, log
from gpucloud_operator.instances.kubeapi import Obj
from gpucloud_operator.instances.preemption import NOTICE_CLEARED
from gpucloud_operator.instances.storage import bind_wait


class Step(enum.Enum):
    """What a pass does once the billing rules of the pass are done."""

    STOP = "stop"  # active, spec.state Stopped: stop the run
    MARK_STOPPED = "mark-stopped"  # not running, spec.state Stopped: say so
    NOTHING = "nothing"  # already down as asked
    OBSERVE_START = "observe-start"  # admitted: create the run, or see it run
    OBSERVE_RUNNING = "observe-running"  # running: meter, cost, pod gone?
    STAY_DOWN = "stay-down"  # halted (or stopped) and the spec did not change since
    START = "start"  # admission, placement, the run's pod
    RESUME = "resume"  # queued after a preemption: start again once its node has room


def next_step(phase: str | None, desired: str, halted_this_generation: bool) -> Step:
    """The lifecycle's table: what a pass does for an instance in ``phase`` whose
    spec.state is ``desired``. ``halted_this_generation``: status.haltedGeneration is the
    spec's generation (the instance was halted, and the user changed nothing since)."""
    if desired == "Stopped":
        if phase in r.ACTIVE_PHASES:
            return Step.STOP
        if phase not in ("Stopped", "Expired", "Preempted"):
            return Step.MARK_STOPPED
        return Step.NOTHING
    if phase in r.ADMITTED_PHASES:
        return Step.OBSERVE_START
    if phase == "Running":
        return Step.OBSERVE_RUNNING
    if phase == "Queued":
        return Step.RESUME
    if phase in (*r.HALTED_PHASES, "Stopped") and halted_this_generation:
        return Step.STAY_DOWN
    return Step.START


class Lifecycle(Core):
    """The pass, start, run, stop and release of an instance."""

    def _reconcile(self, p: Pass) -> None:
        if not self._admit_spec(p) or not self._resolve(p):
            return
        p.deferred = {
            "account": p.account,
            "currency": p.pb.currency if p.pb else p.currency,
            "gpuSummary": b.gpu_summary(p.product, p.count),
            "observedGeneration": p.meta.get("generation"),
        }
        try:
            self._reconcile_resolved(p)
        finally:
            if p.deferred:
                self._patch(p, {})

    def _reconcile_resolved(self, p: Pass) -> None:
        self._settle_meters(p)
        if self._wipe_pending(p):  # a deleted volume's folder is not removed yet
            return
        if self._arrears(p):
            return
        self._settle_storage(p, final=False)
        phase = p.phase
        if phase == "Stopping":  # a stop was interrupted: finish it first
            self._stop(p, p.status.get("stopTarget", "Stopped"), "Stopped", "stop completed")
            return
        if self._budget_stop(p):  # StopPayAsYouGo and a spent budget (docs/budgets.md)
            return
        if self._idle_gpus(p):  # idle GPUs and an opt-in stop (docs/idle.md)
            return
        if phase == "Running":
            switched = p.status.get("billingMode") != p.billing_key
            why = r.not_offered(p.pb, p.product, p.billing_key)
            if switched and why is not None:
                self._keep_mode(p, why)  # stays billed as it is, says why
                switched = False
            if switched and not self._switch_mode(p):
                return
            if self._preemption_due(p) or self._package_rules(p):
                return
        else:
            self._leave_idle_package(p)
        desired = p.model.state
        if desired == "Stopped" and phase in r.ADMITTED_PHASES:
            self._bill_if_started(p)  # its pod may have run while nobody watched
            phase = p.phase
        halted_now = p.status.get("haltedGeneration") == p.meta.get("generation")
        step = next_step(phase, desired, halted_now)
        if step is Step.STOP:
            self._stop(p, "Stopped", "Stopped", "stopped by the user (spec.state: Stopped)")
        elif step is Step.MARK_STOPPED:
            self._patch(
                p,
                {
                    "phase": "Stopped",
                    "message": "not running (spec.state: Stopped)",
                    "conditions": self._conditions(
                        p, ("Ready", False, "Stopped", "spec.state is Stopped")
                    ),
                },
            )
        elif step is Step.OBSERVE_START:
            self._observe_start(p)
        elif step is Step.OBSERVE_RUNNING:
            self._observe_running(p)
        elif step is Step.START:
            self._start(p)
        elif step is Step.RESUME:
            self._resume_queued(p)
        # NOTHING, STAY_DOWN: it stays down until the user changes the spec

    def _start(self, p: Pass) -> None:
        """Admission (instance limit, then the money rule) is serialised per account and
        reserves the instance's slot at once; the claim of the run is written after the
        lock is let go (a burst of starts on one account would queue on the API call),
        and placement and object creation happen outside the lock too."""
        assert p.pb is not None
        why = r.not_offered(p.pb, p.product, p.billing_key)
        if why is not None:  # the PriceBook leaves this mode out for the product
            self._refuse(p, "NotOffered", why)
            return
        why = checkpoint_refusal(p.model, self.cfg.preemption_grace_s)
        if why is not None:
            self._refuse(p, "CheckpointTooLong", why)
            return
        if not self._disks_ready(p):  # cloud disks (docs/arrears.md)
            return
        node = p.status.get("volumeNode")
        new_volume = node is None
        if node is None:
            with self._placement_lock:
                node = self._place(p)
        # the money rule and a budget read the ledger (a query per meter of the account)
        # and the instance list: before the lock, as starting a run changes no balance;
        # under it, the instance limit counts runs that other passes are claiming and the
        # money rule deducts what other admissions reserved (a package term is charged only
        # when its pod runs: two package starts must not both count on the same balance)
        money = self._money_rule(p)
        listed = self._listed_reservations(p) if money is not None else {}
        budget = self._budget_rule(p)
        with self._lock(self._account_locks, p.account):
            decision = None if money is None else money(self._reserved(p, listed))
            admitted = self._admit(p, decision, budget)
            if admitted:
                with self._guard:
                    held = (self._phases or {}).get(p.uid)
                self._note_phase(p.uid, p.ns, "Pending")  # counted by the next admission
                mode = r.mode_of(p.billing_key)
                if decision is not None and mode is BillingMode.PACKAGE:
                    self._reserve(p, decision)
        if not admitted:
            with self._placement_lock:
                self._assumed.pop(p.uid, None)
            return
        try:
            runs = int(p.status.get("runs") or 0) + 1
            # a new volume's claim cannot be bound yet: say so now, not in a second patch
            waiting = node is not None and new_volume
            changes: Obj = {
                "phase": "Pending",
                "runs": runs,
                "message": bind_wait(node) if waiting else f"placing run {runs}",
                "haltedGeneration": None,
                **NOTICE_CLEARED,
                "conditions": self._conditions(
                    p,
                    ("Ready", False, "Placing", "waiting for the pod to run"),
                    ("Preempting", False, "NotPreempted", "no preemption notice"),
                ),
            }
            if node is not None:
                changes["volumeNode"] = node
            self._patch(p, changes)
        except BaseException:
            self._note_phase(p.uid, p.ns, held[1] if held else None)  # the slot is free again
            raise
        self._create_run(p, new_volume)

    def _create_run(self, p: Pass, new_volume: bool = False) -> None:
        """The volume (first run only) and the run's pod. ``new_volume``: the volume was
        placed by this pass, so it does not exist yet."""
        with self._guard:  # before the claim is checked: a bind right after wakes us up
            self._awaiting_bind.add(p.uid)
        node, bound = self._volume_node(p, new_volume)
        if node is None:
            message = f"no node offers GPU product {p.product!r}; waiting for one"
            self._patch(
                p,
                {
                    "message": message,
                    "conditions": self._conditions(p, ("Ready", False, "NoNode", message)),
                },
            )
            return
        if bound is None:
            bound = self.kube.pvc_bound(p.ns, b.pvc_name(p.name))
        if not bound:
            # A pod created before its claim binds is parked by the scheduler as
            # "unbound immediate PersistentVolumeClaims" and not retried for minutes, and
            # that reason hides a real GPU shortage from preemption: wait for the bind
            # (claim_changed starts the next pass when it happens).
            self._patch(p, {"message": bind_wait(node)})
            return
        with self._guard:
            self._awaiting_bind.discard(p.uid)
        runs = int(p.status.get("runs") or 0)
        # The billing anchor: the operator's clock just before the pod can exist, saved
        # before it does (a kill right after the create still finds it; a kill before
        # the create writes it again with the next attempt). Rounded up: a fraction of a
        # second is the tenant's. See rules.billed_start.
        anchor = r.fmt(r.second_up(self.clock.now()))
        self._patch(p, {"podCreatedAt": anchor, "podWaitingAt": None})
        crash_point("anchor-saved")
        pod = self.kube.create_pod(b.build_instance_pod(p.inst, runs, p.gpu_resource))
        crash_point("pod-created")
        with self._guard:
            self._run_pods[p.uid] = (pod.get("metadata") or {}).get("uid", "")
        self._event(p, "Normal", "Starting", f"run {runs}: pod created, pinned to {node}")

    def _observe_start(self, p: Pass) -> None:
        runs = int(p.status.get("runs") or 0)
        if runs == 0:
            self._start(p)
            return
        pod = self._pod_now(p, runs)
        if pod is None:
            # not created yet (no node, or an interrupted pass), or deleted by someone
            self._create_run(p)
            return
        labels = pod["metadata"].get("labels") or {}
        if labels.get(b.RUN_LABEL) != str(runs) or pod["metadata"].get("deletionTimestamp"):
            return  # the previous run's pod is still going away
        pod_phase = (pod.get("status") or {}).get("phase")
        if pod_phase == "Running":
            self._begin_billing(p, pod)
        elif pod_phase in ("Succeeded", "Failed"):
            self.kube.delete_pod(p.ns, b.pod_name(p.name), grace_s=0)
        else:
            self._pending(p, pod)

    def _bill_if_started(self, p: Pass) -> None:
        """A stop asked for before the operator saw the run's pod running (it was down):
        if the pod did run, its time is billed like any run's, from its start."""
        runs = int(p.status.get("runs") or 0)
        pod = self.kube.get_pod(p.ns, b.pod_name(p.name)) if runs else None
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        running = (pod.get("status") or {}).get("phase") == "Running"
        if running and (pod["metadata"].get("labels") or {}).get(b.RUN_LABEL) == str(runs):
            self._begin_billing(p, pod)

    def _pod_now(self, p: Pass, runs: int) -> Obj | None:
        """The run's pod. A pass started by the pod's Running event or by its claim's
        bind skips the read (a burst of starts made it one request per step): the event
        showed the pod, or the pod waited for the bind and was not created yet (should a
        concurrent pass have created it meanwhile, creating it again finds it)."""
        seen = p.pod_seen
        if seen is not None and not seen["metadata"].get("deletionTimestamp"):
            with self._guard:  # the very pod this run created, not one of the same name
                ours = self._run_pods.get(p.uid) == seen["metadata"].get("uid")
            labels = seen["metadata"].get("labels") or {}
            running = seen.get("status", {}).get("phase") == "Running"
            if ours and running and labels.get(b.RUN_LABEL) == str(runs):
                return seen
        if p.claim_bound:
            return None
        return self.kube.get_pod(p.ns, b.pod_name(p.name))

    def _pending(self, p: Pass, pod: Obj) -> None:
        """Not placed yet: show the scheduler's reason; a pay-as-you-go or package
        instance short of GPUs may preempt spot instances."""
        conds = (pod.get("status") or {}).get("conditions") or []
        sched = next((c for c in conds if c.get("type") == "PodScheduled"), None)
        if sched is None or sched.get("status") != "False":
            return
        reason = sched.get("reason") or "Unschedulable"
        message = f"{reason}: {sched.get('message') or 'not scheduled yet'}"
        self._patch(
            p,
            {
                # not started at this instant: billing cannot start before it, whatever
                # the kubelet's clock says (rules.billed_start)
                "podWaitingAt": r.fmt(p.now),
                "message": message,
                "conditions": self._conditions(p, ("Ready", False, reason, message)),
            },
        )
        short_of_gpus = "Insufficient nvidia.com/gpu" in message
        if short_of_gpus and p.billing_key != "Spot":
            self._maybe_preempt(p)

    def _begin_billing(self, p: Pass, pod: Obj) -> None:
        """The run started: billing starts when Kubernetes says the pod started
        (rules.billed_start), not when this pass saw it: the operator may have been
        down meanwhile, and the agents' usage since then is charged to the meter."""
        assert p.pb is not None
        key = p.billing_key
        mode = r.mode_of(key)
        node = (pod.get("spec") or {}).get("nodeName")
        since = r.billed_start(
            r.parse(p.status.get("podCreatedAt")),
            pod,
            p.now,
            waiting=r.parse(p.status.get("podWaitingAt")),
        )
        changes: Obj = {
            "phase": "Running",
            "startedAt": r.fmt(since),
            # Instance storage is billed from the first time the pod runs: the volume is
            # bound and mounted and the instance exists for the user. Before that it is a
            # request waiting for GPUs (its volume holds no data), and charging it
            # storage would bill a wait the seed never bills (docs/operator.md).
            "storageSince": p.status.get("storageSince") or r.fmt(since),
            "node": node,
            "billingMode": key,
            "message": f"running on {node}",
            "conditions": self._conditions(
                p,
                ("Ready", True, "Running", f"running on {node}"),
                ("Billing", True, str(key).replace("/", ""), f"billed as {key}"),
            ),
        }
        if mode is BillingMode.PACKAGE:
            term = r.active_term(p.terms, since)
            if term is None and not self._buy_term(p, r.period_of(key), since):
                self._stop(
                    p, "Refused", "InsufficientBalance", "the balance no longer covers the package"
                )
                return
            self._patch(p, changes)
        else:
            meter_id = f"gpu:{p.uid}:{p.status.get('runs')}:{int(since.timestamp())}"
            changes |= {"meterId": meter_id, "meterSince": r.fmt(since)}
            self._patch(p, changes)
            crash_point("billing-saved")
            self._ensure_meter(p, pod)
        p.pod_uid = pod["metadata"]["uid"]  # the run's pod: what a refresh asks about
        self._gpus_eager(p, pod)  # the GPUs' first lookups start with the run
        self._event(
            p, "Normal", "Started", f"running on {node} since {r.fmt(since)}, billed as {key}"
        )
        if mode is BillingMode.PACKAGE:
            self._package_rules(p)  # a day or week package is within the reminder lead

    def _observe_running(self, p: Pass) -> None:
        """A running instance's pass (most are ticks): is its pod still this run's? Asked
        of the pods' watch-fed view; what that says has ended is read again before the
        run is stopped (a view lagging behind never stops a run)."""
        runs = str(p.status.get("runs"))

        def gone(pod: Obj | None) -> bool:
            return (
                pod is None
                or (pod["metadata"].get("labels") or {}).get(b.RUN_LABEL) != runs
                or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            )

        pod = self.kube.seen_pod(p.ns, b.pod_name(p.name))
        if gone(pod):
            pod = self.kube.get_pod(p.ns, b.pod_name(p.name))
        if gone(pod):
            self._stop(p, "Stopped", "PodGone", "the instance's pod ended; billing stopped")
            return
        assert pod is not None
        self._ensure_meter(p, pod)
        p.pod_uid = pod["metadata"]["uid"]
        refreshed = self._update_cost(p, force=False)
        if refreshed or (not p.status.get("gpus") and self._gpus_eager(p, pod)):
            self._show_gpus(p, pod)

    def _stop(self, p: Pass, final: str, reason: str, message: str) -> None:
        """Delete the pod (GPUs are not kept), close the GPU meter at the stop instant
        (persisted first), keep the data."""
        if p.phase != "Stopping":
            self._patch(
                p,
                {
                    "phase": "Stopping",
                    "stoppedAt": r.fmt(p.now),
                    "stopTarget": final,
                    "message": message,
                },
            )
        crash_point("stop-saved")
        stopped_at = r.parse(p.status.get("stoppedAt")) or p.now
        self.kube.delete_pod(p.ns, b.pod_name(p.name))
        with self._placement_lock:  # its pod is gone: nothing of it to count on its node
            self._assumed.pop(p.uid, None)
        meter_id = p.status.get("meterId")
        if meter_id:
            self._close_meter(p, meter_id, stopped_at)
        changes: Obj = {
            "phase": final,
            "stopTarget": None,
            "node": None,
            "gpus": None,  # the pod and its GPUs are gone
            **NOTICE_CLEARED,
            "message": message,
            "conditions": self._conditions(p, ("Ready", False, reason, message)),
        }
        if final in r.HALTED_PHASES or final == "Refused":
            changes["haltedGeneration"] = p.meta.get("generation")
        self._patch(p, changes)
        self._event(p, "Warning" if final != "Stopped" else "Normal", reason, message)
        if p.pb is not None and p.account:
            self._update_cost(p)

    def _stop_instant(self, p: Pass, due: datetime) -> datetime:
        """A stop that was due at ``due`` (a deadline the operator may have slept
        through): at ``due``, but never before the run's billing began nor after now."""
        began = r.parse(p.status.get("meterSince") or p.status.get("startedAt"))
        return min(p.now, max(due, began or due))

    def _stop_at(self, p: Pass, at: datetime, final: str, reason: str, message: str) -> None:
        """_stop with the stop instant ``at`` (in the past) instead of now."""
        saved, p.now = p.now, at
        try:
            self._stop(p, final, reason, message)
        finally:
            p.now = saved

    def _release(self, p: Pass) -> bool:
        if not p.status.get("releasedAt"):
            self._patch(p, {"releasedAt": r.fmt(p.now)})
        released_at = r.parse(p.status["releasedAt"]) or p.now
        resolved = self._resolve(p)
        if p.phase in r.ACTIVE_PHASES:
            saved_now, p.now = p.now, released_at
            self._stop(p, "Stopped", "Released", "released: stopping")
            p.now = saved_now
        if resolved:
            try:
                self._settle_storage(p, final=True)
            except BillingError as exc:
                log.error("storage settlement of %s failed: %s", p.resource, exc)
            if not self._settle_meters(p):
                self._patch(p, {"message": "released: waiting for the last usage to settle"})
                return False
        self.kube.delete_pod(p.ns, b.pod_name(p.name), grace_s=0)
        # the data: the agent of the volume's node removes the folder (durable request in
        # the ledger, so it is done even if that agent is down now; a new instance of the
        # same name waits for it before placing a volume at that path)
        node = p.status.get("volumeNode") or self._pv_node(p)
        if node and p.account:
            self.ledger.request_wipe(
                node, f"instances/{p.ns}/{p.name}", self._wipe_subject(p), p.account, p.now
            )
        self.kube.delete_pvc(p.ns, b.pvc_name(p.name))
        self.kube.delete_pv(b.pv_name(p.uid))
        data = f"the agent of node {node!r} removes the data" if node else "no data was held"
        self._patch(
            p,
            {
                "phase": "Released",
                "message": f"released: settled, pod and volume deleted; {data}",
                "conditions": self._conditions(p, ("Ready", False, "Released", "released")),
            },
        )
        self._event(p, "Normal", "Released", f"settled; pod and volume deleted; {data}")
        self._note_phase(p.uid, p.ns, None)
        with self._placement_lock:
            self._assumed.pop(p.uid, None)
        with self._guard:
            self._awaiting_bind.discard(p.uid)
            self._status_written.discard(p.uid)
            self._known_version.pop(p.uid, None)
            self._run_pods.pop(p.uid, None)
        self._gpus_asked.pop(p.uid, None)
        self._gpus_known.pop(p.uid, None)
        self._cost_shown.pop(p.uid, None)
        self._tickets.drop(p.uid)
        return True
