from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agent_testkit import Receiver, wait_for
from gpucloud_agent.agent import Agent, AgentConfig
from gpucloud_agent.exposition import render
from gpucloud_agent.fake_nvml import FakeNvml
from gpucloud_agent.metrics import AgentCollector
from gpucloud_agent.podresources.client import DeviceHolder
from gpucloud_agent.pods import DerivedUidResolver
from gpucloud_agent.shipper import Shipper
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


def test_run_backs_off_with_full_jitter_while_the_api_fails(
    tmp_path: Path, receiver: Receiver
) -> None:
    wal = Wal(tmp_path / "wal")
    wal.append([gpu_record(i) for i in range(3)])
    waits: list[float] = []
    shipper = Shipper(
        wal, receiver.url, None, backoff_base_s=0.5, backoff_cap_s=4.0, sleep=waits.append
    )
    receiver.set_mode("unavailable")
    thread = threading.Thread(target=shipper.run, daemon=True)
    thread.start()
    wait_for(lambda: len(waits) >= 8, 10, "eight backoffs")
    shipper.stop()
    thread.join(10)
    for attempt, wait in enumerate(waits[:8], start=1):
        assert 0 <= wait <= min(4.0, 0.5 * 2 ** (attempt - 1))
    assert max(waits[:8]) > 0.5  # it grows
    assert wal.backlog == 3  # nothing lost, nothing dead-lettered
    assert shipper.dead_letters.read() == []
    shipper.close()


def _drain(shipper: Shipper, rounds: int = 200) -> None:
    """ship_once until nothing is left to send or progress stops (parked records)."""
    for _ in range(rounds):
        if shipper.ship_once() is None:
            return


def test_refused_records_are_dead_lettered_and_never_block_the_rest(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A 207 (or 422) naming refused records: the rest is acked, the refused ones go to
    the dead-letter file with a metric, and the records behind them are shipped."""
    wal = Wal(tmp_path / "wal")
    wal.append([gpu_record(i) for i in range(10)])
    receiver.refuse = lambda r: "wrong_node" if r["start"] in (3, 7) else None
    shipper = Shipper(wal, receiver.url, None, batch_size=4)
    _drain(shipper)
    assert wal.backlog == 0
    assert sorted(r["start"] for r in receiver.snapshot()) == [0, 1, 2, 4, 5, 6, 8, 9]
    dead = shipper.dead_letters.read()
    assert [(d["record"]["start"], d["status"], d["rule"]) for d in dead] == [
        (3, 207, "wrong_node"),
        (7, 207, "wrong_node"),
    ]
    assert shipper.dead_letters.snapshot() == {"wrong_node": 2}
    # a batch that holds only refused records (422) is dead-lettered as well
    wal.append([gpu_record(20)])
    receiver.refuse = lambda r: "unbound_gpu"
    _drain(shipper)
    assert wal.backlog == 0 and shipper.dead_letters.read()[-1]["status"] == 422
    shipper.close()


def test_a_record_that_makes_the_api_fail_does_not_hold_back_the_rest(
    tmp_path: Path, receiver: Receiver
) -> None:
    """500 for any batch that holds one record: the batch is halved until that record
    travels alone, the others are shipped, and it stays in the WAL (parked, retried
    later, never dropped)."""
    wal = Wal(tmp_path / "wal")
    wal.append([gpu_record(i) for i in range(16)])
    receiver.poison = lambda r: r["start"] == 5
    shipper = Shipper(wal, receiver.url, None, batch_size=8, backoff_base_s=30)
    _drain(shipper)
    assert sorted(r["start"] for r in receiver.snapshot()) == [i for i in range(16) if i != 5]
    assert [r["start"] for _, r in wal.pending(10)] == [5]
    assert shipper.dead_letters.read() == []
    # once its backoff is over it is retried alone, never failing the others' batches
    wal.append([gpu_record(i) for i in range(16, 20)])
    shipper._parked = {rid: (0.0, n) for rid, (_, n) in shipper._parked.items()}
    before = len(receiver.batches)
    _drain(shipper)
    assert receiver.batches[before] == 1  # the parked record, alone
    assert len(receiver.snapshot()) == 19 and [r["start"] for _, r in wal.pending(10)] == [5]
    receiver.poison = lambda r: False  # fixed on the API side
    shipper._parked.clear()  # its backoff is over
    _drain(shipper)
    assert wal.backlog == 0 and len(receiver.snapshot()) == 20
    shipper.close()


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


def test_a_disk_cursor_ahead_of_the_clock_restarts_at_the_current_hour(tmp_path: Path) -> None:
    """A log restored under a clock that is now earlier (another release's file clock, a
    stepped clock) must not stop disk metering until the clock catches up."""
    clock = ManualClock(datetime.fromtimestamp(7200 * 10 + 60, UTC))
    agent = make_agent(tmp_path, clock, {})
    agent.disk_tick()
    agent.wal.close()
    clock.set(datetime.fromtimestamp(7200 + 60, UTC))  # ten hours earlier
    (tmp_path / "disk" / "disks" / "team" / "d1").mkdir(parents=True)
    agent2 = make_agent(tmp_path, clock, {})
    assert agent2.disk_tick() == [] and agent2.disk_cursor == 7200
    clock.advance(3600)
    assert [(r.volume, r.start) for r in agent2.disk_tick()] == [("team/d1", 7200)]


def test_a_gone_pods_allocated_series_is_dropped_after_the_retention(tmp_path: Path) -> None:
    """The allocated-seconds counter keeps a gone pod's series for --series-retention
    (monotonic seconds since the pod last held its GPU), then drops it; running pods,
    and pods that come back, keep counting."""
    clock = ManualClock(datetime.fromtimestamp(36_000, UTC))
    mono = [500.0]
    held: dict[str, DeviceHolder] = {}
    socket_up = [True]

    def holders() -> dict[str, DeviceHolder]:
        if not socket_up[0]:
            raise ConnectionError("pod-resources down")
        return dict(held)

    nvml = FakeNvml.from_node_labels(
        "n1",
        {"nvidia.com/gpu.product": "T4", "nvidia.com/gpu.memory": "15360"},
        {"nvidia.com/gpu": "2"},
        clock,
    )
    agent = Agent(
        AgentConfig(node="n1", series_retention_s=3600),
        nvml,
        holders,
        DerivedUidResolver(),
        Wal(tmp_path / "wal"),
        clock,
        monotonic=lambda: mono[0],
    )
    g0, g1 = (d.uuid for d in agent.devices)
    job, other = ("team", "job", g0, "T4"), ("team", "other", g1, "T4")

    def step(seconds: float = 1) -> None:
        agent.sample_once()
        clock.advance(seconds)
        mono[0] += seconds

    def exposed() -> dict[str, float]:
        text = render(AgentCollector(agent.stats, lambda: 0, lambda: 0)())
        prefix = "gpucloud_gpu_allocated_seconds_total{"
        return {
            re.search(r'pod="([^"]*)"', line)[1]: float(line.rsplit(" ", 1)[1])  # type: ignore[index]
            for line in text.splitlines()
            if line.startswith(prefix)
        }

    held[g0] = DeviceHolder("team", "job", "main")
    held[g1] = DeviceHolder("team", "other", "main")
    for _ in range(5):
        step()
    assert exposed() == {"job": 5, "other": 5}
    # gone for a short while, back within the retention: the same series counts on
    del held[g0]
    for _ in range(10):
        step()
    assert exposed()["job"] == 5
    held[g0] = DeviceHolder("team", "job", "main")
    step()
    assert exposed()["job"] == 6  # the free seconds were not attributed
    # gone for good: held at the sample just taken (t); still shown at t + retention
    del held[g0]
    step(3599)
    step(1)
    assert agent.stats.allocated[job] == 6 and exposed()["job"] == 6
    step()  # the first sample past t + retention
    assert exposed() == {"other": agent.stats.allocated[other]}
    assert job not in agent.stats.allocated and job not in agent.stats.allocated_at
    # the same pod back later: a new series from 0 (a counter reset to Prometheus)
    held[g0] = DeviceHolder("team", "job", "main")
    step()
    step()
    assert exposed()["job"] == 2
    # pod-resources down for longer than the retention forgets no running pod: its
    # series is refreshed at the first sample that sees the holders again
    socket_up[0] = False
    step(4000)
    socket_up[0] = True
    step()
    assert set(exposed()) == {"job", "other"}
    # the usage records are untouched by what /metrics forgets: the closed windows hold
    # 5 + 1 + 2 seconds (the second after the outage is in the open window)
    recs = [r for _, r in agent.wal.pending(10_000) if r["pod"]["name"] == "job"]
    assert sum(r["end"] - r["start"] for r in recs) == 8
