"""NVML behind a small interface: the real backend (pynvml) and what both backends return."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    product: str
    memory_total_bytes: int


@dataclass(frozen=True)
class MigDevice:
    """One MIG device of a GPU in MIG mode: what a ``nvidia.com/mig-<profile>`` (or, in the
    single strategy, ``nvidia.com/gpu``) device ID names."""

    parent_index: int
    uuid: str  # MIG-...
    product: str  # <GPU>-MIG-<profile>, as GPU Feature Discovery labels it
    memory_total_bytes: int


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int


class NvmlError(RuntimeError):
    """NVML could not be used; the message says why and what to check."""


class Nvml(Protocol):
    def devices(self) -> list[GpuDevice]: ...

    def utilization_percent(self, index: int) -> int: ...

    def memory_used_bytes(self, index: int) -> int: ...

    def processes(self, index: int) -> list[GpuProcess]: ...

    def mig_devices(self, index: int) -> list[MigDevice]:
        """The MIG devices of GPU ``index`` (none unless it is in MIG mode)."""
        ...

    def close(self) -> None: ...


class NoGpus:
    """An agent that meters no GPUs (``--nvml none``): the shared-storage meter."""

    def devices(self) -> list[GpuDevice]:
        return []

    def utilization_percent(self, index: int) -> int:
        raise IndexError(index)

    def memory_used_bytes(self, index: int) -> int:
        raise IndexError(index)

    def processes(self, index: int) -> list[GpuProcess]:
        raise IndexError(index)

    def mig_devices(self, index: int) -> list[MigDevice]:
        raise IndexError(index)

    def close(self) -> None:
        pass


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str on recent versions and bytes on old ones
    return value.decode() if isinstance(value, bytes) else value


def product_label(nvml_name: str) -> str:
    """NVML's device name as the node label `nvidia.com/gpu.product` spells it.

    GPU feature discovery labels a node with the NVML name, spaces turned into dashes
    ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3"); price books and node selectors
    use that label, so the agent reports products the same way (seen on a real H100).
    """
    return "-".join(nvml_name.split())


class NvmlBackend:
    """The real NVML, through nvidia-ml-py (`pynvml`)."""

    def __init__(self) -> None:
        import pynvml

        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as exc:
            raise NvmlError(
                "NVML library (libnvidia-ml.so.1) not found: this node has no NVIDIA driver, "
                "or the agent container does not mount it; use --nvml fake on test beds"
            ) from exc
        except pynvml.NVMLError as exc:
            raise NvmlError(f"NVML initialisation failed: {exc}") from exc
        self._handles: list[Any] = []
        self._devices: list[GpuDevice] = []
        self._migs: list[list[MigDevice]] = []
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._handles.append(handle)
                self._devices.append(
                    GpuDevice(
                        index=index,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        product=product_label(_text(pynvml.nvmlDeviceGetName(handle))),
                        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
                self._migs.append(self._read_migs(index, handle))
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NvmlError(f"NVML could not enumerate devices: {exc}") from exc

    def _read_migs(self, index: int, handle: Any) -> list[MigDevice]:
        """MIG devices through NVML's MIG handles. A GPU without MIG support answers
        NotSupported to the mode query: no MIG devices. The layout is read once: the
        device plugin is restarted (and so is the agent) when an admin repartitions."""
        nv = self._nvml
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(handle)
        except nv.NVMLError_NotSupported:
            return []
        if current != nv.NVML_DEVICE_MIG_ENABLE:
            return []
        out = []
        for i in range(nv.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
            except nv.NVMLError_NotFound:
                continue  # a slot with no MIG device in it
            out.append(
                MigDevice(
                    parent_index=index,
                    uuid=_text(nv.nvmlDeviceGetUUID(mig)),
                    # NVML names a MIG device "<GPU name> MIG 1g.10gb"
                    product=product_label(_text(nv.nvmlDeviceGetName(mig))),
                    memory_total_bytes=int(nv.nvmlDeviceGetMemoryInfo(mig).total),
                )
            )
        return out

    def devices(self) -> list[GpuDevice]:
        return list(self._devices)

    def mig_devices(self, index: int) -> list[MigDevice]:
        return list(self._migs[index])

    def utilization_percent(self, index: int) -> int:
        return int(self._nvml.nvmlDeviceGetUtilizationRates(self._handles[index]).gpu)

    def memory_used_bytes(self, index: int) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handles[index]).used)

    def processes(self, index: int) -> list[GpuProcess]:
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handles[index])
        # usedGpuMemory is None when the driver cannot tell (e.g. without privileges)
        return [GpuProcess(int(p.pid), int(p.usedGpuMemory or 0)) for p in procs]

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
