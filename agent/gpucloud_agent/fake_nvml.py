"""A fake NVML for the test bed: devices follow the node's GPU labels and capacity.

UUIDs are derived from the node name and index, and utilisation and memory are a
deterministic function of (index, current second of the injected clock), so tests
can predict every value.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gpucloud.clock import Clock, SystemClock
from gpucloud_agent.nvml import GpuDevice, GpuProcess

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, as GPU Feature Discovery writes it
GPU_RESOURCE = "nvidia.com/gpu"
_UUID_NAMESPACE = uuid.UUID("6f1d3a52-8d0e-4c55-9a3e-1b6c2f0a9d11")
MIB = 1 << 20


def fake_gpu_uuid(node: str, index: int) -> str:
    return "GPU-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node}/{index}"))


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
    ) -> None:
        """``uuids``: the node's device plugin's own (kind tier); else derived."""
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

    @classmethod
    def from_node_labels(
        cls,
        node: str,
        labels: Mapping[str, str],
        capacity: Mapping[str, str | int],
        clock: Clock | None = None,
        uuids: list[str] | None = None,
    ) -> FakeNvml:
        try:
            count = int(capacity.get(GPU_RESOURCE, 0))
        except ValueError as exc:
            raise ValueError(f"capacity {GPU_RESOURCE}: not an integer") from exc
        product = labels.get(PRODUCT_LABEL)
        if not product:
            raise ValueError(f"label {PRODUCT_LABEL}: missing on node {node}")
        try:
            memory_mib = int(labels.get(MEMORY_LABEL, ""))
        except ValueError as exc:
            raise ValueError(f"label {MEMORY_LABEL}: must be an integer number of MiB") from exc
        return cls(node, count, product, memory_mib, clock, uuids)

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
