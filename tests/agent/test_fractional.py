"""MIG devices and time-sliced replicas, metered each as its own product (issue 19): the
fake NVML's layouts from a node's capacity, the device plugin's device IDs, the
pod-resources attribution of MIG UUIDs and ``<uuid>::<n>`` replicas through a real gRPC
socket, and the records the agent writes for them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpucloud_agent.agent import Agent, AgentConfig
from gpucloud_agent.devices import DeviceMap
from gpucloud_agent.fake_nvml import FakeNvml
from gpucloud_agent.nvml import GpuDevice, MigDevice
from gpucloud_agent.podresources.client import PodResourcesClient
from gpucloud_agent.podresources.fake_server import FakePod, serve
from gpucloud_agent.pods import DerivedUidResolver
from gpucloud_agent.records import UsageRecord
from gpucloud_agent.wal import Wal

from gpucloud import gpu_kinds as gk
from gpucloud.clock import ManualClock

H100 = "NVIDIA-H100-80GB-HBM3"
MIG_1G = f"{H100}-MIG-1g.10gb"
LABELS = {"nvidia.com/gpu.product": H100, "nvidia.com/gpu.memory": "81559"}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_seven_1g_slices_of_a_mixed_node_are_one_gpu_in_mig_mode() -> None:
    nvml = FakeNvml.from_node_labels("n", LABELS, {"nvidia.com/mig-1g.10gb": "7"})
    [gpu] = nvml.devices()
    migs = nvml.mig_devices(gpu.index)
    assert [m.product for m in migs] == [MIG_1G] * 7
    assert {m.memory_total_bytes for m in migs} == {10 * 2**30}
    assert len({m.uuid for m in migs}) == 7 and all(m.uuid.startswith("MIG-") for m in migs)
    assert nvml.device_ids() == {"nvidia.com/mig-1g.10gb": [m.uuid for m in migs]}


def test_mig_profiles_pack_into_gpus_of_seven_compute_slices() -> None:
    assert gk.pack_mig(["1g.10gb"] * 8) == [["1g.10gb"] * 7, ["1g.10gb"]]
    assert gk.pack_mig(["1g.10gb", "3g.40gb", "3g.40gb", "2g.20gb"]) == [
        ["3g.40gb", "3g.40gb", "1g.10gb"],
        ["2g.20gb"],
    ]


def test_single_strategy_and_time_slicing_labels() -> None:
    single = FakeNvml.from_node_labels(
        "s", {**LABELS, "nvidia.com/gpu.product": MIG_1G}, {"nvidia.com/gpu": "7"}
    )
    assert [d.product for d in single.devices()] == [H100]
    assert list(single.device_ids()) == ["nvidia.com/gpu"]
    assert all(i.startswith("MIG-") for i in single.device_ids()["nvidia.com/gpu"])
    shared = FakeNvml.from_node_labels(
        "t", {**LABELS, "nvidia.com/gpu.replicas": "4"}, {"nvidia.com/gpu.shared": "8"}
    )
    ids = shared.device_ids()["nvidia.com/gpu.shared"]
    gpus = [d.uuid for d in shared.devices()]
    assert ids == [f"{g}::{n}" for g in gpus for n in range(4)]
    with pytest.raises(ValueError, match=r"nvidia\.com/gpu\.replicas"):
        FakeNvml.from_node_labels(
            "t", {**LABELS, "nvidia.com/gpu.replicas": "4"}, {"nvidia.com/gpu.shared": "6"}
        )


def test_device_map_names_slices_replicas_and_whole_gpus() -> None:
    gpus = [GpuDevice(0, "GPU-a", H100, 1), GpuDevice(1, "GPU-b", H100, 1)]
    mig = MigDevice(0, "MIG-x", MIG_1G, 1)
    dm = DeviceMap(gpus, {0: [mig]})
    assert dm.ref("MIG-x").product == MIG_1G  # type: ignore[union-attr]
    assert dm.ref("GPU-a") is None  # in MIG mode: the GPU itself is never held
    assert dm.ref("GPU-b").product == H100  # type: ignore[union-attr]
    assert dm.ref("GPU-b::2").product == f"{H100}-SHARED"  # type: ignore[union-attr]
    assert dm.ref("GPU-a::0") is None  # a MIG GPU is not time-sliced
    assert dm.ref("GPU-elsewhere::0") is None  # not this node's
    seen = dm.observe({"GPU-b::1": "p"}, [])
    assert {r.uuid: h for r, h in seen.items()} == {"MIG-x": None, "GPU-b": None, "GPU-b::1": "p"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[FakeNvml, list[FakePod], str]]:
    """A node with one whole GPU, 7 x 1g.10gb and one GPU time-sliced 4 ways, and a real
    pod-resources gRPC server handing its device IDs to pods."""
    nvml = FakeNvml.from_node_labels(
        "node-a",
        {**LABELS, "nvidia.com/gpu.replicas": "4"},
        {"nvidia.com/gpu": "1", "nvidia.com/mig-1g.10gb": "7", "nvidia.com/gpu.shared": "4"},
        ManualClock(T0),
    )
    pods: list[FakePod] = [FakePod("t", "whole", "u-w", (("main", 1),))]
    pods += [FakePod("t", f"mig-{i}", f"u-m{i}", (("main", 1),), "nvidia.com/mig-1g.10gb")
             for i in range(7)]  # fmt: skip
    pods += [FakePod("t", f"share-{n}", f"u-s{n}", (("main", 1),), "nvidia.com/gpu.shared")
             for n in range(4)]  # fmt: skip
    sock = str(tmp_path / "kubelet.sock")
    server = serve(sock, lambda: list(pods), nvml.device_ids())
    try:
        yield nvml, pods, sock
    finally:
        server.stop(None)


def test_the_agent_meters_each_slice_and_share_as_its_own_product(
    node: tuple[FakeNvml, list[FakePod], str], tmp_path: Path
) -> None:
    nvml, pods, sock = node
    clock = ManualClock(T0)
    client = PodResourcesClient(sock)
    agent = Agent(AgentConfig("node-a"), nvml, client.holders, DerivedUidResolver(),
                  Wal(tmp_path / "wal"), clock)  # fmt: skip
    records: list[UsageRecord] = []
    for _ in range(25):
        records += agent.sample_once()
        clock.advance(1)
    pods.clear()  # every pod gone: the open windows close
    records += agent.sample_once()
    client.close()
    seconds: dict[tuple[str, str, str], int] = {}
    for r in records:
        assert r.gpu is not None and r.pod is not None
        key = (r.pod.name, r.gpu.uuid, r.gpu.product)
        seconds[key] = seconds.get(key, 0) + r.quantity
    by_pod = {name: (uuid, product, n) for (name, uuid, product), n in seconds.items()}
    assert len(by_pod) == len(seconds) == 12  # one device per pod, never two pods per device
    migs = {m.uuid for m in nvml.mig_devices(1)}
    shared_gpu = nvml.devices()[2].uuid
    assert by_pod["whole"] == (nvml.devices()[0].uuid, H100, 25)
    assert {by_pod[f"mig-{i}"][0] for i in range(7)} == migs
    assert {by_pod[f"mig-{i}"][1:] for i in range(7)} == {(MIG_1G, 25)}
    assert {by_pod[f"share-{n}"][0] for n in range(4)} == {f"{shared_gpu}::{n}" for n in range(4)}
    assert {by_pod[f"share-{n}"][1:] for n in range(4)} == {(f"{H100}-SHARED", 25)}


def test_pod_resources_client_attributes_every_nvidia_gpu_resource(
    node: tuple[FakeNvml, list[FakePod], str],
) -> None:
    nvml, _, sock = node
    client = PodResourcesClient(sock)
    try:
        held = client.holders()
        only_whole = PodResourcesClient(sock, resource="nvidia.com/gpu").holders()
    finally:
        client.close()
    assert set(held) == {i for ids in nvml.device_ids().values() for i in ids}
    assert {h.pod for h in only_whole.values()} == {"whole"}


def test_the_kind_device_plugins_devices_file_of_a_mig_node(tmp_path: Path) -> None:
    """What fake-gpu-device-plugin writes for ``gpucloud.dev/fake-gpu.mig=8x1g.10gb``
    (its spec_test.go pins the same MIG UUID)."""
    uuids = ["GPU-11111111-2222-5333-8444-555555555555", "GPU-aaaaaaaa-bbbb-5ccc-8ddd-eeeeeeeeeeee"]
    cfg = {"node": "node-a", "labels": LABELS, "capacity": {"nvidia.com/mig-1g.10gb": 8},
           "uuids": uuids}  # fmt: skip
    (tmp_path / "devices.json").write_text(json.dumps(cfg))
    nvml = FakeNvml.from_config(tmp_path / "devices.json")
    assert [d.uuid for d in nvml.devices()] == uuids
    ids = nvml.device_ids()["nvidia.com/mig-1g.10gb"]
    assert ids[3] == "MIG-fd1f585b-c631-5b4d-ac5a-f333708c27f3" and len(ids) == 8


class _StubNvml:
    """NVML's MIG calls as a driver answers them for one H100 in MIG mode with 3 of its 7
    slots filled (the GPU is hardware: a stand-in for it, not for our code)."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class _Mem:
        def __init__(self, total: int) -> None:
            self.total, self.used = total, 0

    def __init__(self, mig_mode: int | None) -> None:
        self.mig_mode = mig_mode
        self.filled = {0: "a", 2: "b", 5: "c"}

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return "gpu"

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:
        return b"GPU-0000" if handle == "gpu" else f"MIG-{handle}".encode()

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA H100 80GB HBM3" + ("" if handle == "gpu" else " MIG 1g.10gb")

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> _Mem:
        return self._Mem(81559 << 20 if handle == "gpu" else 9856 << 20)

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:
        if self.mig_mode is None:
            raise self.NVMLError_NotSupported()
        return [self.mig_mode, self.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, i: int) -> str:
        if i not in self.filled:
            raise self.NVMLError_NotFound()
        return self.filled[i]


@pytest.mark.parametrize(("mode", "migs"), [(1, ["MIG-a", "MIG-b", "MIG-c"]), (0, []), (None, [])])
def test_the_real_backend_lists_mig_devices_through_nvmls_mig_handles(
    monkeypatch: pytest.MonkeyPatch, mode: int | None, migs: list[str]
) -> None:
    """MIG mode on: the filled slots, skipped where NVML answers NotFound, each named as
    GPU Feature Discovery labels it; MIG off, or a GPU without MIG: none."""
    import sys

    from gpucloud_agent.nvml import NvmlBackend

    monkeypatch.setitem(sys.modules, "pynvml", _StubNvml(mode))
    nvml = NvmlBackend()
    found = nvml.mig_devices(0)
    assert [m.uuid for m in found] == migs
    assert {m.product for m in found} <= {MIG_1G}
    assert all(m.memory_total_bytes == 9856 << 20 and m.parent_index == 0 for m in found)
    assert nvml.devices()[0].product == H100
