"""Placement: the node a first run's volume (and so every run of the instance) is pinned
to, and whether that node has room again for a queued instance (``_room_on``).
Serialised by the placement lock (see ``concurrency``): this process's own
placements whose pods the cached pod list does not show yet (``_assumed``) and those of
another process (status.volumeNode of an admitted instance without a pod) hold their
GPUs, so two placements never count on the same GPUs. The scheduler has the last word
on every pod; the choice itself is pure (``gpucloud_operator.placement``)."""

from __future__ import annotations

from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import PLURAL, Obj
from gpucloud_operator.placement import (
    PodGPUs,
    choose_node,
    fallback_node,
    free_gpus,
    largest_node,
)


class Placement(Core):
    """The volume's node of a first placement."""

    def _held_gpus(self, p: Pass) -> list[PodGPUs]:
        """What holds GPUs now, for placement (under the placement lock): the scheduled
        pods, the starts of this process the list does not show yet, and those of
        another process (``_placed_elsewhere``)."""
        # a few seconds stale at most: this pass's own placements are in _assumed until
        # the list shows them, and the scheduler has the last word on every pod
        listed = self.kube.gpu_pods(ttl=5.0, resource=p.gpu_resource)
        seen = {(x["namespace"], x["name"]) for x in listed}
        pods = [self._pod_gpus(x, {}) for x in listed]
        for uid, (ns, pod, node, gpus) in list(self._assumed.items()):
            if (ns, pod) in seen:
                del self._assumed[uid]  # the list shows it now
            else:
                pods.append(PodGPUs(ns, pod, node, gpus, spot=False, started_at=None))
        return pods + self._placed_elsewhere(p, seen)

    def _room_on(self, p: Pass, node: str) -> bool:
        """Whether ``node`` (schedulable) has the instance's GPUs free now; if so they are
        held for its start (``_assumed``) until its pod shows, so two queued instances
        never count on the same GPUs."""
        with self._placement_lock:
            self._assumed.pop(p.uid, None)
            nodes = self.kube.gpu_nodes(p.gpu_resource)
            if not any(n.name == node and n.schedulable for n in nodes):
                return False
            if free_gpus(nodes, self._held_gpus(p)).get(node, 0) < p.count:
                return False
            self._assumed[p.uid] = (p.ns, b.pod_name(p.name), node, p.count)
            return True

    def _place(self, p: Pass) -> str | None:
        nodes = self.kube.gpu_nodes(p.gpu_resource)
        pods = self._held_gpus(p)
        node = (
            choose_node(nodes, pods, p.product, p.count)
            or fallback_node(nodes, p.product, p.count)
            or largest_node(nodes, p.product)
        )
        if node is not None:
            self._assumed[p.uid] = (p.ns, b.pod_name(p.name), node, p.count)
        return node

    def _placed_elsewhere(self, p: Pass, seen: set[tuple[str, str]]) -> list[PodGPUs]:
        """Starts placed by another process (a replica that died, this one before a
        restart) whose pods do not exist yet, e.g. waiting for their claim to bind: their
        volumes hold the GPUs of their node as surely as this process's own ``_assumed``
        ones, so a standby taking over a burst does not pin more volumes to a node than
        it has GPUs."""
        out = []
        for inst in self.kube.list_cluster_objects(PLURAL, ttl=2.0):
            meta, st = inst["metadata"], inst.get("status") or {}
            pod = (meta["namespace"], b.pod_name(meta["name"]))
            node = st.get("volumeNode")
            if (
                node
                and st.get("phase") in r.ADMITTED_PHASES
                and meta["uid"] not in (p.uid, *self._assumed)
                and pod not in seen
            ):
                gpu = (inst.get("spec") or {}).get("gpu") or {}
                if r.resource_of(p.pb, gpu.get("product")) != p.gpu_resource:
                    continue  # another pool of the node (a MIG profile, shares, whole GPUs)
                count = int(gpu.get("count", 1))
                out.append(PodGPUs(meta["namespace"], meta["name"], node, count, False, None))
        return out

    def _pod_gpus(self, pod: Obj, instances: dict[tuple[str, str], Obj]) -> PodGPUs:
        labels = pod["labels"]
        name = labels.get(b.INSTANCE_LABEL, "")
        st = (instances.get((pod["namespace"], name)) or {}).get("status") or {}
        return PodGPUs(
            namespace=pod["namespace"],
            instance=name,
            node=pod["node"],
            gpus=pod["gpus"],
            spot=bool(name) and labels.get(b.MODE_LABEL) == "Spot",
            started_at=r.parse(st.get("startedAt")),
            preempting=bool(st.get("preemptAt")) or pod["deleting"],
        )
