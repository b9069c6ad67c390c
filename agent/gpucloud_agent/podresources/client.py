"""A client of the kubelet's `v1.PodResourcesLister` service (gRPC on a unix socket).

It speaks gRPC through ``unary`` (HTTP/2 by ``h2``) and decodes the answer with
``proto``: grpcio and protobuf cost the agent 13 MiB of memory and most of its CPU
(issue 20). The generated ``api_pb2*`` modules serve the test beds' fake server only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpucloud.gpu_kinds import is_gpu_resource
from gpucloud_agent.podresources.proto import (
    ListPodResourcesResponse,
    ProtobufError,
    parse_list_response,
)
from gpucloud_agent.podresources.unary import RpcError, UnaryChannel

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST = "/v1.PodResourcesLister/List"


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
        self._channel = UnaryChannel(socket_path, timeout_s)

    def list_raw(self) -> ListPodResourcesResponse:
        try:
            # ListPodResourcesRequest has no fields: its encoding is empty
            return parse_list_response(self._channel.call(LIST))
        except (RpcError, ProtobufError) as exc:
            why = f"pod-resources List on {self.socket_path} failed: {exc}"
            raise PodResourcesError(why) from exc

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
