"""A pod-resources server for one fake node of the test bed.

It serves `v1.PodResourcesLister/List` on a unix socket, for the pods that the
Kubernetes API server placed on the node (Running, requesting one of NVIDIA's GPU
resources: `nvidia.com/gpu`, `nvidia.com/gpu.shared`, `nvidia.com/mig-<profile>`),
and gives them the node's fake device IDs of that resource (GPU UUIDs, MIG UUIDs,
replicas `<GPU UUID>::<n>`: `FakeNvml.device_ids`), deterministically and stably: a pod
keeps its devices for its lifetime, freed ones are reused lowest index first.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpucloud.gpu_kinds import is_gpu_resource
from gpucloud_agent.fake_nvml import GPU_RESOURCE, fake_gpu_uuid
from gpucloud_agent.podresources import api_pb2, api_pb2_grpc


@dataclass(frozen=True)
class FakePod:
    namespace: str
    name: str
    uid: str
    # (container name, GPUs requested), in spec order
    containers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    resource: str = GPU_RESOURCE  # the GPU resource its containers request


DeviceIds = Sequence[str] | Mapping[str, Sequence[str]]  # a sequence: nvidia.com/gpu's


PodSource = Callable[[], Sequence[FakePod]]


class DeviceAllocator:
    """Stable assignment of a node's device IDs to pods' containers, per resource."""

    def __init__(self, device_ids: DeviceIds) -> None:
        if not isinstance(device_ids, Mapping):
            device_ids = {GPU_RESOURCE: device_ids}
        self.device_ids = {r: list(ids) for r, ids in device_ids.items()}
        self._by_pod: dict[str, dict[str, list[str]]] = {}  # pod uid -> container -> ids
        self._lock = threading.Lock()

    def assign(self, pods: Sequence[FakePod]) -> list[tuple[FakePod, dict[str, list[str]]]]:
        with self._lock:
            live = {p.uid for p in pods}
            for uid in list(self._by_pod):
                if uid not in live:
                    del self._by_pod[uid]  # the pod is gone: its GPUs are free again
            used = {d for conts in self._by_pod.values() for ids in conts.values() for d in ids}
            free = {r: [d for d in ids if d not in used] for r, ids in self.device_ids.items()}
            out = []
            for pod in pods:
                if pod.uid not in self._by_pod:
                    wanted = sum(n for _, n in pod.containers)
                    pool = free.get(pod.resource, [])
                    if wanted > len(pool):
                        continue  # a real kubelet would not admit it; it gets nothing
                    conts: dict[str, list[str]] = {}
                    for name, n in pod.containers:
                        conts[name], pool = pool[:n], pool[n:]
                    free[pod.resource] = pool
                    self._by_pod[pod.uid] = conts
                out.append((pod, self._by_pod[pod.uid]))
            return out


class FakePodResourcesServicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, source: PodSource, allocator: DeviceAllocator) -> None:
        self.source = source
        self.allocator = allocator

    def List(self, request: Any, context: Any) -> api_pb2.ListPodResourcesResponse:
        resp = api_pb2.ListPodResourcesResponse()
        for pod, conts in self.allocator.assign(list(self.source())):
            pr = resp.pod_resources.add(name=pod.name, namespace=pod.namespace)
            for cname, _ in pod.containers:
                c = pr.containers.add(name=cname)
                if conts.get(cname):
                    c.devices.add(resource_name=pod.resource, device_ids=conts[cname])
        return resp


def serve(
    socket_path: str, source: PodSource, device_ids: DeviceIds, max_workers: int = 4
) -> grpc.Server:
    """Start serving on `socket_path` (replacing a stale socket); the caller stops it."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(
        FakePodResourcesServicer(source, DeviceAllocator(device_ids)), server
    )
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    return server


def _gpus_requested(container: Any) -> tuple[str, int]:
    """(the NVIDIA GPU resource it requests, how many); (nvidia.com/gpu, 0) for none."""
    res = container.resources
    for table in (res.limits if res else None, res.requests if res else None):
        for name, value in (table or {}).items():
            if is_gpu_resource(name):
                return name, int(value)
    return GPU_RESOURCE, 0


class KubePodSource:
    """Pods on `node` from the API server: Running and requesting GPUs (listed, cached 1 s)."""

    def __init__(self, node: str, kubeconfig: str | None = None, cache_s: float = 1.0) -> None:
        from kubernetes import client, config

        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        else:
            config.load_incluster_config()
        self._api = client.CoreV1Api()
        self.node = node
        self.cache_s = cache_s
        self._cached: tuple[float, list[FakePod]] = (-1e9, [])
        self._lock = threading.Lock()

    def __call__(self) -> list[FakePod]:
        with self._lock:
            at, pods = self._cached
            if time.monotonic() - at < self.cache_s:
                return pods
            items = self._api.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node},status.phase=Running"
            ).items
            # oldest first, so assignment order follows admission order
            items.sort(key=lambda p: (p.metadata.creation_timestamp, p.metadata.uid))
            pods = []
            for p in items:
                asked = [(c.name, *_gpus_requested(c)) for c in p.spec.containers]
                containers = tuple((name, n) for name, _, n in asked)
                resource = next((r for _, r, n in asked if n), None)
                if resource is not None:
                    meta = p.metadata
                    pods.append(FakePod(meta.namespace, meta.name, meta.uid, containers, resource))
            self._cached = (time.monotonic(), pods)
            return pods


def node_device_ids(node: str, kubeconfig: str | None) -> dict[str, list[str]]:
    """What the node's device plugin would advertise, from its labels and capacity (the
    same fake NVML the node's agent builds with ``--fake-from-kube``)."""
    from kubernetes import client, config

    from gpucloud_agent.fake_nvml import FakeNvml

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
    obj = client.CoreV1Api().read_node(node)
    labels, capacity = obj.metadata.labels or {}, obj.status.capacity or {}
    return FakeNvml.from_node_labels(node, labels, capacity).device_ids()


def fake_device_ids(node: str, count: int) -> list[str]:
    return [fake_gpu_uuid(node, i) for i in range(count)]
