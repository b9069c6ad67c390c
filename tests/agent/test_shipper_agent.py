from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agent_testkit import Receiver
from gpucloud_agent.agent import Agent, AgentConfig
from gpucloud_agent.fake_nvml import FakeNvml
from gpucloud_agent.podresources.client import DeviceHolder
from gpucloud_agent.pods import DerivedUidResolver
from gpucloud_agent.shipper import Shipper, full_jitter
from gpucloud_agent.wal import Wal

from gpucloud.clock import ManualClock
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord


def gpu_record(start: int) -> dict:  # type: ignore[type-arg]
    return UsageRecord(
        kind=UsageKind.GPU_TIME,
        node="n1",
        start=start,
        end=start + 1,
        quantity=1,
        gpu=GPURef(uuid="GPU-1", product="T4"),
        pod=PodRef(namespace="t", name="p", uid="u"),
    ).model_dump(mode="json")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_full_jitter_is_bounded_by_the_exponential_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 40):
        v = full_jitter(attempt, 0.5, 30, rng)
        assert 0 <= v <= min(30, 0.5 * 2 ** (attempt - 1))


def test_ships_with_bearer_token_and_acks_only_after_200(
    tmp_path: Path, receiver: Receiver
) -> None:
    (tmp_path / "token").write_text("sa-token-123\n")
    wal = Wal(tmp_path / "wal")
    wal.append([gpu_record(i) for i in range(5)])
    shipper = Shipper(wal, receiver.url, str(tmp_path / "token"), batch_size=2)
    receiver.set_mode("unavailable")
    assert shipper.ship_once() is False
    assert wal.backlog == 5 and shipper.errors_total == 1
    receiver.set_mode("down")
    assert shipper.ship_once() is False
    receiver.set_mode("ok")
    while shipper.ship_once():
        pass
    assert wal.backlog == 0 and len(receiver.records) == 5
    assert receiver.tokens == {"Bearer sa-token-123"}
    shipper.close()


def make_agent(tmp_path: Path, clock: ManualClock, held: dict[str, DeviceHolder]) -> Agent:
    nvml = FakeNvml.from_node_labels(
        "n1",
        {"nvidia.com/gpu.product": "T4", "nvidia.com/gpu.memory": "15360"},
        {"nvidia.com/gpu": "2"},
        clock,
    )
    return Agent(
        AgentConfig(node="n1", disk_root=str(tmp_path / "disk")),
        nvml,
        lambda: dict(held),
        DerivedUidResolver(),
        Wal(tmp_path / "wal"),
        clock,
    )


def test_agent_meters_gpus_and_resumes_from_the_wal(tmp_path: Path) -> None:
    clock = ManualClock(datetime.fromtimestamp(36_000, UTC))
    held: dict[str, DeviceHolder] = {}
    agent = make_agent(tmp_path, clock, held)
    g0 = agent.devices[0].uuid
    held[g0] = DeviceHolder("team", "job", "main")
    for _ in range(14):
        agent.sample_once()
        clock.advance(1)
    assert agent.wal.backlog == 1  # [36000, 36010); 4 s still in the open window
    agent.wal.close()
    # a new process: resumes the open window from the WAL cursor, re-emits nothing
    agent2 = make_agent(tmp_path, clock, held)
    agent2.sample_once()  # second 36014, bridged to the same pod
    held.clear()
    clock.advance(1)
    agent2.sample_once()
    recs = [r for _, r in agent2.wal.pending(10)]
    assert [(r["start"], r["end"]) for r in recs] == [(36000, 36010), (36010, 36015)]
    assert agent2.stats.allocated == {("team", "job", g0, "T4"): 1}
    assert agent2.ready()


def test_agent_emits_hourly_disk_records_measured_at_the_end_of_the_hour(tmp_path: Path) -> None:
    clock = ManualClock(datetime.fromtimestamp(7200 + 1800, UTC))
    agent = make_agent(tmp_path, clock, {})
    vol = tmp_path / "disk" / "disks" / "team" / "d1"
    vol.mkdir(parents=True)
    assert agent.disk_tick() == []  # the hour in progress is [7200, 10800)
    (vol / "f").write_bytes(b"x" * (1 << 20))
    clock.advance(1800)
    recs = agent.disk_tick()
    assert [(r.kind, r.volume, r.start, r.end) for r in recs] == [
        (UsageKind.CLOUD_DISK, "team/d1", 7200, 10800)
    ]
    assert recs[0].quantity >= 1 << 20
    assert agent.disk_tick() == []  # once per hour
    assert agent.stats.disk[("cloud_disk", "team", "d1")] == recs[0].quantity
