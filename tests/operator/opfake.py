"""An in-memory stand-in for gpucloud_operator.kube.Kube, for reconciler unit tests.

It keeps objects as the API server would return them and "schedules" a pod the way
the test bed does: onto the node its volume is pinned to, if enough GPUs are free there;
otherwise the pod stays Pending with an Unschedulable condition. The end-to-end tests
check the same behaviour against the real control plane.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from gpucloud_operator.cluster_view import pod_row
from gpucloud_operator.placement import NodeGPUs

Obj = dict[str, Any]


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKube:
    def __init__(self, nodes: list[NodeGPUs]) -> None:
        self.nodes = nodes
        self.cluster: dict[tuple[str, str], Obj] = {}  # (plural, name)
        self.namespaced: dict[tuple[str, str, str], Obj] = {}  # (plural, ns, name)
        self.pods: dict[tuple[str, str], Obj] = {}
        self.pvs: dict[str, Obj] = {}
        self.pvcs: dict[tuple[str, str], Obj] = {}
        self.events: list[tuple[str, str, str, str]] = []  # (object name, type, reason, msg)
        self.deleted_pods: list[tuple[str, str, int | None]] = []  # (ns, name, grace asked)
        self.forgotten: list[str] = []  # cached lists the reconcilers dropped
        self.start_delay_s = 0  # how long the kubelet takes from a pod's creation to its start
        self.unseen_pods: set[tuple[str, str]] = set()  # (ns, name): the pods view lags

    # -- test helpers ---------------------------------------------------------------
    def add_cluster(self, plural: str, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", str(uuid.uuid4()))
        obj["metadata"].setdefault("generation", 1)
        self.cluster[(plural, obj["metadata"]["name"])] = obj
        return obj

    def add_namespaced(self, plural: str, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        self.namespaced[(plural, meta["namespace"], meta["name"])] = obj
        return obj

    def update_spec(self, plural: str, ns: str, name: str, spec: Obj) -> None:
        obj = self.namespaced[(plural, ns, name)]
        obj["spec"] = {**obj["spec"], **spec}
        obj["metadata"]["generation"] += 1

    def instance(self, ns: str, name: str) -> Obj:
        return self.namespaced[("gpuinstances", ns, name)]

    def reasons(self, name: str) -> list[str]:
        return [reason for obj, _, reason, _ in self.events if obj == name]

    def schedule(self) -> None:
        """Place pending pods where their volume lives, if the GPUs are free."""
        for pod in self.pods.values():
            if pod["status"]["phase"] != "Pending":
                continue
            claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
            pvc = self.pvcs[(pod["metadata"]["namespace"], claim)]
            pv = self.pvs[pvc["spec"]["volumeName"]]
            expr = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]
            node = expr["matchExpressions"][0]["values"][0]
            need = int(pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            cap = next(n.allocatable for n in self.nodes if n.name == node)
            used = sum(p["gpus"] for p in self.gpu_pods() if p["node"] == node)
            if used + need <= cap:
                pod["spec"]["nodeName"] = node
                # the kubelet's record, on the cluster's wall clock, not the operator's
                started = datetime.now(UTC) + timedelta(seconds=self.start_delay_s)
                pod["status"] = {
                    "phase": "Running",
                    "containerStatuses": [
                        {"name": "main", "state": {"running": {"startedAt": _ts(started)}}}
                    ],
                }
            else:
                pod["status"]["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": f"0/{len(self.nodes)} nodes are available: "
                        "1 Insufficient nvidia.com/gpu.",
                    }
                ]

    # -- the KubeAPI protocol -------------------------------------------------------
    def list_cluster_objects(self, plural: str, ttl: float = 0.0) -> list[Obj]:
        if plural == "gpuinstances":
            return [copy.deepcopy(o) for (p, _, _), o in self.namespaced.items() if p == plural]
        return [copy.deepcopy(o) for (p, _), o in self.cluster.items() if p == plural]

    def get_cluster_object(self, plural: str, name: str) -> Obj | None:
        obj = self.cluster.get((plural, name))
        return copy.deepcopy(obj) if obj else None

    def forget(self, plural: str) -> None:
        self.forgotten.append(plural)  # nothing is cached here

    def get_namespaced_object(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self.namespaced.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def get_pricebook(self, name: str, ttl: float = 2.0) -> Obj | None:
        obj = self.cluster.get(("pricebooks", name))
        return copy.deepcopy(obj) if obj else None

    def patch_status(self, plural: str, namespace: str | None, name: str, status: Obj) -> Obj:
        obj = (
            self.cluster[(plural, name)]
            if namespace is None
            else self.namespaced[(plural, namespace, name)]
        )
        merge_patch(obj.setdefault("status", {}), copy.deepcopy(status))
        return copy.deepcopy(obj)

    def get_pod(self, namespace: str, name: str) -> Obj | None:
        pod = self.pods.get((namespace, name))
        return copy.deepcopy(pod) if pod else None

    def seen_pod(self, namespace: str, name: str) -> Obj | None:
        """The watch-fed view's answer: the pod now, unless a test made the view lag
        (``unseen_pods``: pods the view has not seen yet)."""
        if (namespace, name) in self.unseen_pods:
            return None
        pod = self.pods.get((namespace, name))
        return pod_row(pod) if pod else None  # only what the real view keeps

    def create_pod(self, pod: Obj) -> Obj:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if key not in self.pods:
            pod = copy.deepcopy(pod)
            pod["metadata"]["uid"] = str(uuid.uuid4())
            pod["metadata"]["creationTimestamp"] = _ts(datetime.now(UTC))
            pod["status"] = {"phase": "Pending"}
            self.pods[key] = pod
        return copy.deepcopy(self.pods[key])

    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None:
        if self.pods.pop((namespace, name), None) is not None:
            self.deleted_pods.append((namespace, name, grace_s))

    def patch_pod_labels(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        if (namespace, name) in self.pods:
            self.pods[(namespace, name)]["metadata"]["labels"].update(labels)

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> Obj | None:
        pod = self.pods.get((namespace, name))
        if pod is None:
            return None
        pod["metadata"].setdefault("annotations", {}).update(annotations)
        return copy.deepcopy(pod)

    def ensure_pvc(self, pvc: Obj) -> None:
        self.pvcs.setdefault((pvc["metadata"]["namespace"], pvc["metadata"]["name"]), pvc)

    def pvc_bound(self, namespace: str, name: str) -> bool:
        """The fake binds a claim as soon as it exists (the pre-bound local volume)."""
        return (namespace, name) in self.pvcs

    def ensure_pv(self, pv: Obj) -> None:
        self.pvs.setdefault(pv["metadata"]["name"], pv)

    def delete_pvc(self, namespace: str, name: str) -> None:
        self.pvcs.pop((namespace, name), None)

    def delete_pv(self, name: str) -> None:
        self.pvs.pop(name, None)

    def gpu_nodes(self, resource: str = "nvidia.com/gpu") -> list[NodeGPUs]:
        return list(self.nodes) if resource == "nvidia.com/gpu" else []

    def gpu_pods(self, ttl: float = 0.0, resource: str = "nvidia.com/gpu") -> list[Obj]:
        out = []
        for pod in self.pods.values():
            limits = pod["spec"]["containers"][0]["resources"]["limits"]
            if pod["spec"].get("nodeName") and resource in limits:
                out.append(
                    {
                        "namespace": pod["metadata"]["namespace"],
                        "name": pod["metadata"]["name"],
                        "labels": pod["metadata"]["labels"],
                        "node": pod["spec"]["nodeName"],
                        "gpus": int(limits[resource]),
                        "deleting": False,
                    }
                )
        return out

    def event(
        self, obj: Obj, type_: str, reason: str, message: str, now: datetime | None = None
    ) -> None:
        self.events.append((obj["metadata"]["name"], type_, reason, message))


def merge_patch(target: Obj, patch: Obj) -> None:
    """RFC 7386, as the API server applies a merge patch: objects merge key by key, None
    deletes, anything else (lists included) replaces."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge_patch(target[k], v)
        else:
            target[k] = v
