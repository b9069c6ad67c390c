"""A real gRPC client of the kubelet's `v1.PodResourcesLister` service."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gpucloud_agent.podresources import api_pb2, api_pb2_grpc

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class DeviceHolder:
    namespace: str
    pod: str
    container: str


class PodResourcesError(RuntimeError):
    pass


class PodResourcesClient:
    def __init__(
        self, socket_path: str = DEFAULT_SOCKET, resource: str = GPU_RESOURCE, timeout_s: float = 2
    ) -> None:
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
        """Device ID (a GPU UUID for the NVIDIA device plugin) -> the container holding it."""
        out: dict[str, DeviceHolder] = {}
        for pod in self.list_raw().pod_resources:
            for container in pod.containers:
                for devices in container.devices:
                    if devices.resource_name != self.resource:
                        continue
                    for device_id in devices.device_ids:
                        out[device_id] = DeviceHolder(pod.namespace, pod.name, container.name)
        return out

    def close(self) -> None:
        self._channel.close()
