"""A real gRPC client of the kubelet's `v1.PodResourcesLister` service."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gpucloud.gpu_kinds import is_gpu_resource
from gpucloud_agent.podresources import api_pb2, api_pb2_grpc

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


@dataclass(frozen=True)
class DeviceHolder:
    namespace: str
    pod: str
    container: str


class PodResourcesError(RuntimeError):
    pass


class PodResourcesClient:
    def __init__(
        self, socket_path: str = DEFAULT_SOCKET, resource: str | None = None, timeout_s: float = 2
    ) -> None:
        """``resource``: the one resource to attribute; None: every NVIDIA GPU resource
        (``nvidia.com/gpu``, ``nvidia.com/gpu.shared``, ``nvidia.com/mig-<profile>``)."""
        self.socket_path = socket_path
        self.resource = resource
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)

    def list_raw(self) -> api_pb2.ListPodResourcesResponse:
        try:
            return self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise PodResourcesError(
                f"pod-resources List on {self.socket_path} failed: {exc.code().name}"  # type: ignore[attr-defined]
            ) from exc

    def holders(self) -> dict[str, DeviceHolder]:
        """Device ID (a GPU UUID, a MIG UUID or a time-slicing replica ``<GPU UUID>::<n>``)
        -> the container holding it."""
        out: dict[str, DeviceHolder] = {}
        for pod in self.list_raw().pod_resources:
            for container in pod.containers:
                for devices in container.devices:
                    name = devices.resource_name
                    if name != self.resource if self.resource else not is_gpu_resource(name):
                        continue
                    for device_id in devices.device_ids:
                        out[device_id] = DeviceHolder(pod.namespace, pod.name, container.name)
        return out

    def close(self) -> None:
        self._channel.close()
