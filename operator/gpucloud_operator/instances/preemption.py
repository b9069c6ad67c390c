"""Spot preemption (docs/spot.md): a pay-as-you-go or package start short of GPUs gives
the fewest, youngest spot instances on its volume's node a notice (status.preemptAt, a
condition, an event); the notice reaches the workload (the pod's notice file through its
annotation, the account's webhook); each pod is asked to stop at its deadline, or its
checkpoint's timeout before it, even when that passed while the operator was down
(billed only up to it); with ``spec.spot.resume`` the instance is then queued and
starts again on its node when GPUs there free up. The plan is pure
(``gpucloud_operator.placement``)."""

from __future__ import annotations

from datetime import datetime, timedelta

from gpucloud import ownership
from gpucloud.crd import SpecError, parse
from gpucloud.crd.account import AccountSpec
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.core import Core, Pass, log
from gpucloud_operator.instances.kubeapi import PLURAL, Obj
from gpucloud_operator.notify import payload, webhook_url
from gpucloud_operator.placement import PodGPUs, plan_preemption

WEBHOOK_TYPE = "spot.preemption"
# What a run's start and stop clear: a notice belongs to one run.
NOTICE_CLEARED: Obj = {
    "preemptAt": None,
    "preemptedFor": None,
    "preemptNoticeAt": None,
    "preemptStopAt": None,
}


class Preemption(Core):
    """Notices to spot instances, their delivery, the stop when a notice runs out, and
    the resume queue."""

    def _maybe_preempt(self, p: Pass) -> None:
        instances = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i
            for i in self.kube.list_cluster_objects(PLURAL)
        }
        listed = self.kube.gpu_pods(resource=p.gpu_resource)
        pods = [self._pod_gpus(x, instances) for x in listed]
        plan = plan_preemption(
            self.kube.gpu_nodes(p.gpu_resource),
            pods,
            p.product,
            p.count,
            only_node=p.status.get("volumeNode"),
        )
        if plan is None:
            return
        deadline = p.now + timedelta(seconds=self.cfg.preemption_grace_s)
        given = [v for v in plan.victims if self._give_notice(p, v, instances, deadline)]
        if given:
            names = ", ".join(f"{v.namespace}/{v.instance}" for v in given)
            message = f"spot instance(s) {names} on {plan.node} given notice"
            self._event(p, "Normal", "PreemptingSpot", message)

    def _give_notice(
        self, p: Pass, victim: PodGPUs, instances: dict[tuple[str, str], Obj], deadline: datetime
    ) -> bool:
        """Notice to one victim, under its lock (``concurrency``): the decision is saved
        first (a restart keeps its deadline), then delivered. False: skipped (gone, no
        longer running, already under notice, or its lock busy: the next pass plans again)."""
        listed = instances.get((victim.namespace, victim.instance))
        if listed is None:
            return False
        lock = self._lock(self._locks, listed["metadata"]["uid"])
        if not lock.acquire(timeout=self.notice_lock_s):
            where = f"{victim.namespace}/{victim.instance}"
            log.info("notice to %s deferred: a pass over it is running", where)
            return False
        try:
            fresh = self.kube.get_namespaced_object(PLURAL, victim.namespace, victim.instance)
            if fresh is None or fresh["metadata"]["uid"] != listed["metadata"]["uid"]:
                return False
            v = self._pass(fresh)
            v.now = p.now
            if v.phase not in r.ACTIVE_PHASES or v.phase == "Stopping" or v.status.get("preemptAt"):
                return False
            # another namespace's instance is not named in the message (its tenant's)
            wanted = p.name if p.ns == v.ns else "an instance in another namespace"
            message = (
                f"preempted for {wanted} ({p.model.billing.mode}): this spot "
                f"instance stops at {r.fmt(deadline)} (grace {self.cfg.preemption_grace_s} s); "
                "its data is kept and billing ends at the stop"
            )
            self._patch(
                v,
                {
                    "preemptAt": r.fmt(deadline),
                    "preemptNoticeAt": r.fmt(p.now),
                    "preemptedFor": p.resource,
                    "message": message,
                    "conditions": self._conditions(
                        v, ("Preempting", True, "PreemptionNotice", message)
                    ),
                },
            )
            self._event(v, "Warning", "PreemptionNotice", message)
            self.spot_metrics.notices.labels(v.product).inc()
            crash_point("notice-given")
            self._deliver_notice(v)
        finally:
            lock.release()
        return True

    def _deliver_notice(self, p: Pass) -> None:
        """The notice reaches the workload: the pod's annotation (its notice file) and the
        account's webhook, once per notice: ``preemptStopAt`` is written after both (a
        kill in between delivers it again, with the same stop time). The pod says how
        long its checkpoint takes, so it is asked to stop that much earlier, never before
        the notice."""
        deadline = r.parse(p.status.get("preemptAt"))
        if deadline is None or p.status.get("preemptStopAt"):
            return
        pod = self.kube.patch_pod_annotations(
            p.ns, b.pod_name(p.name), {b.NOTICE_ANNOTATION: r.fmt(deadline)}
        )
        noticed = r.parse(p.status.get("preemptNoticeAt")) or p.now
        checkpoint_s = b.pod_checkpoint_seconds(pod) if pod else 0
        stop_at = min(deadline, max(deadline - timedelta(seconds=checkpoint_s), noticed))
        accounts = self.kube.list_cluster_objects("accounts", ttl=2.0)
        acct = ownership.account_for(accounts, p.ns)
        if acct is not None:
            resume = p.model.spot is not None and p.model.spot.resume
            text = (
                f"spot instance {p.resource} is preempted: its pod is asked to stop at "
                f"{r.fmt(stop_at)}"
                + (f" (checkpoint: {checkpoint_s} s)" if checkpoint_s else "")
                + f" and is gone by {r.fmt(deadline)}; billing ends at {r.fmt(stop_at)}; "
                + ("it is queued to resume on its node" if resume else "its data is kept")
            )
            body = payload(
                WEBHOOK_TYPE,
                acct["metadata"]["name"],
                text,
                p.now,
                instance=p.name,
                namespace=p.ns,
                stopAt=r.fmt(deadline),
                checkpointAt=r.fmt(stop_at),
                reason="GPUsNeeded",
                resume=resume,
            )
            try:
                spec: AccountSpec | None = parse(AccountSpec, acct.get("spec"))
            except SpecError:  # the account pass reports it; the notice still goes out
                spec = None
            self.notifier.notify(webhook_url(spec, self.cfg.webhook_url), body)
        self._patch(p, {"preemptStopAt": r.fmt(stop_at)})
        self._pass_at(p, stop_at)  # the stop comes on time, not at the next tick

    def _preemption_due(self, p: Pass) -> bool:
        """Deliver a notice not delivered yet; stop a spot instance whose notice ran out,
        at the instant the notice promised (its checkpoint's timeout before the deadline):
        one that passed while the operator was down is carried out at once and billed
        only up to it. With ``spec.spot.resume`` it is queued instead of halted."""
        if r.parse(p.status.get("preemptAt")) is None:
            return False
        self._deliver_notice(p)
        due = r.parse(p.status.get("preemptStopAt") or p.status.get("preemptAt"))
        assert due is not None
        if p.now < due:
            return False
        at = self._stop_instant(p, due)
        self._mark_waiting(p.status.get("preemptedFor"), p.now)
        resume = p.model.spot is not None and p.model.spot.resume
        node = p.status.get("volumeNode")
        what = (
            f"queued to resume on {node} when its GPUs free up (spec.spot.resume)"
            if resume
            else "data kept"
        )
        self._stop_at(
            p,
            at,
            "Queued" if resume else "Preempted",
            "Preempted",
            f"stopped at {r.fmt(at)} to free GPUs (spot); {what}; no billing after the stop",
        )
        self.spot_metrics.preemptions.labels(p.product).inc()
        return True

    def _resume_queued(self, p: Pass) -> None:
        """A preempted instance with ``spec.spot.resume`` waits without a pod (nothing
        billed for GPUs) until the node holding its data has room for it, then starts a
        new run there (admission as any start: the instance limit, the one-hour rule)."""
        node = p.status.get("volumeNode")
        if node is not None and not self._room_on(p, node):
            self._patch(
                p,
                {
                    "message": f"queued: waiting for {p.count} free GPU(s) on {node}, the "
                    "node holding its data (spec.spot.resume); no GPU billing while queued"
                },
            )
            return
        self._event(p, "Normal", "Resuming", f"GPUs free on {node}: starting a new run")
        self._start(p)
        if p.phase == "Pending":
            self.spot_metrics.resumes.labels(p.product).inc()
        else:  # refused before admission (or waiting for a disk): hold no GPUs for it
            with self._placement_lock:
                self._assumed.pop(p.uid, None)

    def _mark_waiting(self, resource: str | None, now: datetime) -> None:
        """The instance a preemption frees GPUs for is still waiting for them now (its
        pod cannot be placed before the victim's pod goes): say so in its status, so its
        billing cannot start earlier whatever the clocks say (rules.billed_start)."""
        if not resource:
            return
        ns, name = resource.split("/", 1)
        waiting = self.kube.get_namespaced_object(PLURAL, ns, name)
        if waiting is not None and (waiting.get("status") or {}).get("phase") == "Pending":
            self.kube.patch_status(PLURAL, ns, name, {"podWaitingAt": r.fmt(now)})
