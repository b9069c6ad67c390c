"""What the agent meters: the device IDs pod-resources can name, each with its product.

A GPU not in MIG mode is one device (its UUID, its product), unless its device plugin
time-slices it: then pod-resources names replicas ``<GPU UUID>::<n>``, each a device of
product ``<GPU>-SHARED`` billed on its own. A GPU in MIG mode is its MIG devices (``MIG-``
UUIDs, product ``<GPU>-MIG-<profile>``); the GPU itself is never held. Pure: the caller
reads NVML and pod-resources (docs/fractional-gpus.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from gpucloud import gpu_kinds as gk
from gpucloud_agent.nvml import GpuDevice, MigDevice
from gpucloud_agent.records import GPURef

H = TypeVar("H")


class DeviceMap:
    def __init__(self, devices: Iterable[GpuDevice], migs: Mapping[int, list[MigDevice]]) -> None:
        self._static: dict[str, GPURef] = {}
        self._shareable: dict[str, str] = {}  # GPU UUID -> its product, for replicas
        for d in devices:
            if migs.get(d.index):
                for m in migs[d.index]:
                    self._static[m.uuid] = GPURef(uuid=m.uuid, product=m.product)
            else:
                self._static[d.uuid] = GPURef(uuid=d.uuid, product=d.product)
                self._shareable[d.uuid] = d.product
        self._replicas: dict[str, GPURef] = {}

    def ref(self, device_id: str) -> GPURef | None:
        """The device a pod-resources device ID names; None if not one of this node's."""
        ref = self._static.get(device_id) or self._replicas.get(device_id)
        if ref is None and gk.device_kind(device_id) is gk.GPUKind.SHARED:
            product = self._shareable.get(gk.replica_parent(device_id))
            if product is not None:
                ref = self._replicas[device_id] = GPURef(
                    uuid=device_id, product=gk.shared_product(product)
                )
        return ref

    def observe(self, held: Mapping[str, H], known: Iterable[GPURef]) -> dict[GPURef, H | None]:
        """Every device -> its holder (None: free) this sample: the node's GPUs and MIG
        devices, the replicas held now, and ``known`` ones (the meter's cursors), so a
        replica that was let go closes its window."""
        out: dict[GPURef, H | None] = dict.fromkeys(self._static.values())
        for ref in known:
            out.setdefault(ref, None)
        for device_id, holder in held.items():
            ref = self.ref(device_id)
            if ref is not None:
                out[ref] = holder
        return out
