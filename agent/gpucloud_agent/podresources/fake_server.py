"""A pod-resources server for one fake node of the test bed.

It serves `v1.PodResourcesLister/List` on a unix socket, for the pods that the
Kubernetes API server placed on the node (Running, requesting `nvidia.com/gpu`),
and gives them the node's fake GPU UUIDs, deterministically and stably: a pod keeps
its GPUs for its lifetime, freed GPUs are reused lowest index first.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpucloud_agent.fake_nvml import GPU_RESOURCE, fake_gpu_uuid
from gpucloud_agent.podresources import api_pb2, api_pb2_grpc


@dataclass(frozen=True)
class FakePod:
    namespace: str
    name: str
    uid: str
    # (container name, GPUs requested), in spec order
    containers: tuple[tuple[str, int], ...] = field(default_factory=tuple)


PodSource = Callable[[], Sequence[FakePod]]


class DeviceAllocator:
    """Stable assignment of a node's device IDs to pods' containers."""

    def __init__(self, device_ids: Sequence[str]) -> None:
        self.device_ids = list(device_ids)
        self._by_pod: dict[str, dict[str, list[str]]] = {}  # pod uid -> container -> ids
        self._lock = threading.Lock()

    def assign(self, pods: Sequence[FakePod]) -> list[tuple[FakePod, dict[str, list[str]]]]:
        with self._lock:
            live = {p.uid for p in pods}
            for uid in list(self._by_pod):
                if uid not in live:
                    del self._by_pod[uid]  # the pod is gone: its GPUs are free again
            used = {d for conts in self._by_pod.values() for ids in conts.values() for d in ids}
            free = [d for d in self.device_ids if d not in used]
            out = []
            for pod in pods:
                if pod.uid not in self._by_pod:
                    wanted = sum(n for _, n in pod.containers)
                    if wanted > len(free):
                        continue  # a real kubelet would not admit it; it gets nothing
                    conts: dict[str, list[str]] = {}
                    for name, n in pod.containers:
                        conts[name], free = free[:n], free[n:]
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
                    c.devices.add(resource_name=GPU_RESOURCE, device_ids=conts[cname])
        return resp


def serve(
    socket_path: str, source: PodSource, device_ids: Sequence[str], max_workers: int = 4
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


def _gpus_requested(container: Any) -> int:
    res = container.resources
    for table in (res.limits if res else None, res.requests if res else None):
        if table and GPU_RESOURCE in table:
            return int(table[GPU_RESOURCE])
    return 0


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
                containers = tuple((c.name, _gpus_requested(c)) for c in p.spec.containers)
                if any(n for _, n in containers):
                    pods.append(
                        FakePod(p.metadata.namespace, p.metadata.name, p.metadata.uid, containers)
                    )
            self._cached = (time.monotonic(), pods)
            return pods


def node_gpu_count(node: str, kubeconfig: str | None) -> int:
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
    obj = client.CoreV1Api().read_node(node)
    return int((obj.status.capacity or {}).get(GPU_RESOURCE, 0))


def fake_device_ids(node: str, count: int) -> list[str]:
    return [fake_gpu_uuid(node, i) for i in range(count)]
