from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gpucloud_agent.fake_nvml import FakeNvml, fake_gpu_uuid
from gpucloud_agent.nvml import NvmlBackend, NvmlError, product_label

from gpucloud.clock import ManualClock

LABELS = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920"}


def test_fake_follows_node_labels_and_capacity() -> None:
    clock = ManualClock(datetime.fromtimestamp(1_000_000, UTC))
    nvml = FakeNvml.from_node_labels("gpu-node-1", LABELS, {"nvidia.com/gpu": "4"}, clock)
    devs = nvml.devices()
    assert [d.index for d in devs] == [0, 1, 2, 3]
    assert {d.product for d in devs} == {"NVIDIA-A100-SXM4-80GB"}
    assert {d.memory_total_bytes for d in devs} == {81920 << 20}
    assert devs[2].uuid == fake_gpu_uuid("gpu-node-1", 2)
    assert devs[2].uuid.startswith("GPU-") and uuid.UUID(devs[2].uuid[4:]).version == 5
    assert fake_gpu_uuid("gpu-node-2", 2) != devs[2].uuid
    # utilisation and memory are a function of (index, second): predictable
    assert nvml.utilization_percent(1) == (17 + 7 * 1_000_000) % 101
    clock.advance(1)
    assert nvml.utilization_percent(1) == (17 + 7 * 1_000_001) % 101
    used = nvml.memory_used_bytes(1)
    assert 0 <= used <= devs[1].memory_total_bytes and used % (1 << 20) == 0
    assert [p.used_memory_bytes for p in nvml.processes(1)] == ([used] if used else [])


def test_fake_from_json_and_yaml(tmp_path: Path) -> None:
    cfg = {"node": "n1", "labels": LABELS, "capacity": {"nvidia.com/gpu": 2}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "c.yaml").write_text(
        "node: n1\nlabels:\n  nvidia.com/gpu.product: T4\n  nvidia.com/gpu.memory: '15360'\n"
        "capacity:\n  nvidia.com/gpu: '1'\n"
    )
    assert len(FakeNvml.from_config(tmp_path / "c.json").devices()) == 2
    assert FakeNvml.from_config(tmp_path / "c.yaml").devices()[0].product == "T4"


def test_fake_answers_for_the_device_plugins_uuids(tmp_path: Path) -> None:
    # the kind tier's fake device plugin writes its node's GPUs; the agent takes them as is
    uuids = ["GPU-11111111-2222-5333-8444-555555555555", "GPU-aaaaaaaa-bbbb-5ccc-8ddd-eeeeeeeeeeee"]
    cfg = {"node": "n1", "labels": LABELS, "capacity": {"nvidia.com/gpu": 2}, "uuids": uuids}
    (tmp_path / "devices.json").write_text(json.dumps(cfg))
    assert [d.uuid for d in FakeNvml.from_config(tmp_path / "devices.json").devices()] == uuids
    for bad in (uuids[:1], [uuids[0], uuids[0]], "GPU-1"):
        (tmp_path / "bad.json").write_text(json.dumps({**cfg, "uuids": bad}))
        with pytest.raises(ValueError, match="uuids"):
            FakeNvml.from_config(tmp_path / "bad.json")


def test_fake_uuid_matches_the_kind_device_plugin() -> None:
    # hack/kind/kindagents/cmd/fake-gpu-device-plugin/spec_test.go pins the same value
    assert fake_gpu_uuid("node-a", 0) == "GPU-74d34b24-f5bb-52be-a451-b36458e5e9a8"


@pytest.mark.parametrize(
    ("labels", "capacity", "match"),
    [
        ({}, {"nvidia.com/gpu": "1"}, "nvidia.com/gpu.product"),
        ({**LABELS, "nvidia.com/gpu.memory": "lots"}, {"nvidia.com/gpu": "1"}, "gpu.memory"),
        (LABELS, {"nvidia.com/gpu": "x"}, "capacity nvidia.com/gpu"),
    ],
)
def test_fake_rejects_bad_labels(labels: dict, capacity: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        FakeNvml.from_node_labels("n1", labels, capacity)


def test_real_backend_fails_clearly_without_a_gpu() -> None:
    try:
        nvml = NvmlBackend()
    except NvmlError as exc:
        assert "NVML" in str(exc)
    else:  # a GPU machine: the real backend must answer
        assert all(d.uuid.startswith(("GPU-", "MIG-")) for d in nvml.devices())
        nvml.close()


@pytest.mark.parametrize(
    ("nvml_name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),  # what a real H100 reports
        ("NVIDIA A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA-GeForce-RTX-4090"),
        ("Tesla T4", "Tesla-T4"),
    ],
)
def test_product_label_matches_the_node_label(nvml_name: str, label: str) -> None:
    assert product_label(nvml_name) == label
