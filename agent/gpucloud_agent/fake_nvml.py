"""A fake NVML for the test bed: devices follow the node's GPU labels and capacity.

UUIDs are derived from the node name and index, and utilisation and memory are a
deterministic function of (index, current second of the injected clock), so tests
can predict every value.

Fractional GPUs (docs/fractional-gpus.md) follow the same capacity: each
``nvidia.com/mig-<profile>`` device (mixed strategy), or each ``nvidia.com/gpu`` of a node
labelled ``<GPU>-MIG-<profile>`` (single strategy), is a MIG device, packed first-fit
into GPUs of 7 compute slices; ``nvidia.com/gpu.shared`` (or ``nvidia.com/gpu`` of a node
labelled ``<GPU>-SHARED``) counts time-slicing replicas, ``nvidia.com/gpu.replicas`` per
GPU. ``device_ids()`` is what the node's device plugin advertises, per resource.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gpucloud import gpu_kinds as gk
from gpucloud.clock import Clock, SystemClock
from gpucloud_agent.nvml import GpuDevice, GpuProcess, MigDevice

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, as GPU Feature Discovery writes it
REPLICAS_LABEL = "nvidia.com/gpu.replicas"  # GPU Feature Discovery, time-slicing
GPU_RESOURCE = gk.GPU_RESOURCE
_UUID_NAMESPACE = uuid.UUID("6f1d3a52-8d0e-4c55-9a3e-1b6c2f0a9d11")
MIB = 1 << 20


def fake_gpu_uuid(node: str, index: int) -> str:
    return "GPU-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node}/{index}"))


def fake_mig_uuid(node: str, gpu: int, slot: int) -> str:
    return "MIG-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node}/{gpu}/mig/{slot}"))


def _int(capacity: Mapping[str, str | int], name: str) -> int:
    try:
        return int(capacity.get(name, 0))
    except ValueError as exc:
        raise ValueError(f"capacity {name}: not an integer") from exc


def fake_utilization_percent(index: int, second: int) -> int:
    return (17 * index + 7 * second) % 101


def fake_memory_used_bytes(total: int, index: int, second: int) -> int:
    # half the utilisation, in whole MiB, so it never exceeds the total
    return (total // MIB) * fake_utilization_percent(index, second) // 200 * MIB


class FakeNvml:
    def __init__(
        self,
        node: str,
        count: int,
        product: str,
        memory_mib: int,
        clock: Clock | None = None,
        uuids: list[str] | None = None,
        mig: Mapping[int, list[str]] | None = None,
        replicas: Mapping[int, int] | None = None,
        shared_resource: str = gk.SHARED_RESOURCE,
        mig_strategy: str = "mixed",
    ) -> None:
        """``uuids``: the node's device plugin's own (kind tier); else derived. ``mig``:
        GPU index -> its MIG profiles (e.g. ``{0: ["1g.10gb"] * 7}``); ``replicas``: GPU
        index -> time-slicing replicas, advertised as ``shared_resource``."""
        if not node:
            raise ValueError("fake nvml: node must not be empty")
        if count < 0:
            raise ValueError(f"fake nvml: count must be >= 0, got {count}")
        if memory_mib <= 0:
            raise ValueError(f"fake nvml: memory_mib must be > 0, got {memory_mib}")
        if uuids is None:
            uuids = [fake_gpu_uuid(node, i) for i in range(count)]
        elif len(uuids) != count or len(set(uuids)) != count:
            raise ValueError(f"fake nvml: uuids must be {count} distinct UUIDs, got {uuids}")
        self.node = node
        self._clock = clock or SystemClock()
        self._devices = [GpuDevice(i, u, product, memory_mib * MIB) for i, u in enumerate(uuids)]
        mig, replicas = dict(mig or {}), dict(replicas or {})
        for index in (*mig, *replicas):
            if not 0 <= index < count:
                raise ValueError(f"fake nvml: GPU index {index} is not one of the {count} GPUs")
        if set(mig) & set(replicas):
            raise ValueError("fake nvml: a GPU in MIG mode cannot also be time-sliced")
        self._migs = {
            i: [
                MigDevice(i, fake_mig_uuid(node, i, slot), gk.mig_product(product, prof),
                          int(prof.split(".", 1)[1].removesuffix("gb")) * 1024 * MIB)
                for slot, prof in enumerate(profiles)
            ]
            for i, profiles in mig.items()
        }  # fmt: skip
        self._replicas = replicas
        self.shared_resource = shared_resource
        self.mig_strategy = mig_strategy

    @classmethod
    def from_node_labels(
        cls,
        node: str,
        labels: Mapping[str, str],
        capacity: Mapping[str, str | int],
        clock: Clock | None = None,
        uuids: list[str] | None = None,
    ) -> FakeNvml:
        label = labels.get(PRODUCT_LABEL)
        if not label:
            raise ValueError(f"label {PRODUCT_LABEL}: missing on node {node}")
        try:
            memory_mib = int(labels.get(MEMORY_LABEL, ""))
        except ValueError as exc:
            raise ValueError(f"label {MEMORY_LABEL}: must be an integer number of MiB") from exc
        gpus = _int(capacity, GPU_RESOURCE)
        product, whole, strategy = label, gpus, "mixed"
        profiles: list[str] = []
        shared, shared_resource = _int(capacity, gk.SHARED_RESOURCE), gk.SHARED_RESOURCE
        if gk.MIG_INFIX in label:  # single strategy: every nvidia.com/gpu is a MIG device
            product, profile = label.split(gk.MIG_INFIX, 1)
            profiles, whole, strategy = [profile] * gpus, 0, "single"
        elif label.endswith(gk.SHARED_SUFFIX):  # time-sliced: no whole GPU is sold
            product, whole = label.removesuffix(gk.SHARED_SUFFIX), 0
            if not shared:  # without renameByDefault the replicas are nvidia.com/gpu
                shared, shared_resource = gpus, GPU_RESOURCE
        for name in capacity:
            profile = gk.mig_profile(name)
            if profile is not None:
                profiles += [profile] * _int(capacity, name)
        per_gpu = int(labels.get(REPLICAS_LABEL, "1") or 1)
        if shared % per_gpu:
            raise ValueError(
                f"capacity: {shared} time-slicing replicas is not a multiple of the "
                f"{per_gpu} of label {REPLICAS_LABEL}"
            )
        layouts = gk.pack_mig(profiles)
        count = whole + len(layouts) + shared // per_gpu
        mig = {whole + i: layout for i, layout in enumerate(layouts)}
        first_shared = whole + len(layouts)
        replicas = {first_shared + i: per_gpu for i in range(shared // per_gpu)}
        return cls(node, count, product, memory_mib, clock, uuids, mig, replicas,
                   shared_resource, strategy)  # fmt: skip

    @classmethod
    def from_config(cls, path: str | Path, clock: Clock | None = None) -> FakeNvml:
        """A JSON or YAML file: {node, labels: {...}, capacity: {nvidia.com/gpu: N}},
        optionally with the device UUIDs (``uuids``), as the kind tier's fake device plugin
        writes it for its node: the agent then answers for exactly the plugin's GPUs."""
        text = Path(path).read_text()
        data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(data, dict) or "node" not in data:
            raise ValueError(f"fake nvml config {path}: must be a mapping with a 'node' field")
        uuids = data.get("uuids")
        if uuids is not None and not (
            isinstance(uuids, list) and all(isinstance(u, str) for u in uuids)
        ):
            raise ValueError(f"fake nvml config {path}: uuids must be a list of strings")
        return cls.from_node_labels(
            str(data["node"]), data.get("labels") or {}, data.get("capacity") or {}, clock, uuids
        )

    def _second(self) -> int:
        return int(self._clock.now().timestamp())

    def devices(self) -> list[GpuDevice]:
        return list(self._devices)

    def mig_devices(self, index: int) -> list[MigDevice]:
        return list(self._migs.get(index, ()))

    def device_ids(self) -> dict[str, list[str]]:
        """What the node's NVIDIA device plugin advertises: resource -> device IDs."""
        out: dict[str, list[str]] = {}
        mig_resource = GPU_RESOURCE if self.mig_strategy == "single" else None
        for d in self._devices:
            if d.index in self._migs:
                for m in self._migs[d.index]:
                    profile = m.product.split(gk.MIG_INFIX, 1)[1]
                    res = mig_resource or gk.MIG_RESOURCE_PREFIX + profile
                    out.setdefault(res, []).append(m.uuid)
            elif d.index in self._replicas:
                ids = [f"{d.uuid}{gk.REPLICA_SEP}{n}" for n in range(self._replicas[d.index])]
                out.setdefault(self.shared_resource, []).extend(ids)
            else:
                out.setdefault(GPU_RESOURCE, []).append(d.uuid)
        return out

    def utilization_percent(self, index: int) -> int:
        return fake_utilization_percent(index, self._second())

    def memory_used_bytes(self, index: int) -> int:
        dev = self._devices[index]
        return fake_memory_used_bytes(dev.memory_total_bytes, index, self._second())

    def processes(self, index: int) -> list[GpuProcess]:
        used = self.memory_used_bytes(index)
        return [GpuProcess(10000 + index, used)] if used else []

    def close(self) -> None:
        pass
