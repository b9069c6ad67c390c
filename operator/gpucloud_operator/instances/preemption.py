"""Spot preemption: a pay-as-you-go or package start short of GPUs gives the fewest,
youngest spot instances on its volume's node a notice (status.preemptAt, a condition, an
event); each stops at its deadline, even one that passed while the operator was down
(billed only up to it). The plan is pure (``gpucloud_operator.placement``)."""

from __future__ import annotations

from datetime import datetime, timedelta

from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import PLURAL
from gpucloud_operator.placement import plan_preemption


class Preemption(Core):
    """Notices to spot instances, and the stop when a notice runs out."""

    def _maybe_preempt(self, p: Pass) -> None:
        instances = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i
            for i in self.kube.list_cluster_objects(PLURAL)
        }
        pods = [self._pod_gpus(x, instances) for x in self.kube.gpu_pods()]
        plan = plan_preemption(
            self.kube.gpu_nodes(), pods, p.product, p.count, only_node=p.status.get("volumeNode")
        )
        if plan is None:
            return
        deadline = p.now + timedelta(seconds=self.cfg.preemption_grace_s)
        for victim in plan.victims:
            vic = instances.get((victim.namespace, victim.instance))
            if vic is None:
                continue
            message = (
                f"preempted for {p.resource} ({p.model.billing.mode}): this spot "
                f"instance stops at {r.fmt(deadline)} (grace {self.cfg.preemption_grace_s} s); "
                "its data is kept and billing ends at the stop"
            )
            vic_status = dict(vic.get("status") or {})
            cond = b.condition("Preempting", True, "PreemptionNotice", message, r.fmt(p.now))
            self.kube.patch_status(
                PLURAL,
                victim.namespace,
                victim.instance,
                {
                    "preemptAt": r.fmt(deadline),
                    "preemptedFor": p.resource,
                    "message": message,
                    "conditions": b.merge_conditions(vic_status.get("conditions"), [cond]),
                },
            )
            self.kube.event(vic, "Warning", "PreemptionNotice", message)
            crash_point("notice-given")
        names = ", ".join(f"{v.namespace}/{v.instance}" for v in plan.victims)
        self._event(
            p, "Normal", "PreemptingSpot", f"spot instance(s) {names} on {plan.node} given notice"
        )

    def _preemption_due(self, p: Pass) -> bool:
        """Stop a spot instance whose notice ran out, at the instant the notice promised:
        a deadline that passed while the operator was down is carried out at once and
        billed only up to the deadline."""
        due = r.parse(p.status.get("preemptAt"))
        if due is None or p.now < due:
            return False
        at = self._stop_instant(p, due)
        self._mark_waiting(p.status.get("preemptedFor"), p.now)
        self._stop_at(
            p,
            at,
            "Preempted",
            "Preempted",
            f"stopped at {r.fmt(at)} to free GPUs (spot); data kept, no billing after the stop",
        )
        return True

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
