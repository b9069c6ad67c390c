"""The agent as a real process, killed with SIGKILL and cut off from the API, loses no
GPU-second and bills none twice.

Time is a file clock the test advances; assignments change only at moments the agent
has observed (a pod's devices cannot change while nobody is looking at them in a real
kubelet either: they change when a pod ends or starts, which is when the test syncs).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agent_testkit import AgentProcess, ApiReceiver, free_port, wait_for
from gpucloud_agent.podresources.client import PodResourcesClient
from gpucloud_agent.podresources.fake_server import FakePod, fake_device_ids, serve
from gpucloud_agent.pods import DerivedUidResolver

from gpucloud.clock import FileClock

T0 = 1_800_000_000
SIMULATED_S = 1300
OUTAGE = (T0 + 300, T0 + 900)  # 10 simulated minutes: 503 first, then connection refused
NODE = "node-wal"
GPUS = 3

UIDS = DerivedUidResolver()  # the agent runs with --pod-uid-source derived


@pytest.mark.slow
def test_no_second_lost_or_duplicated_across_kills_and_outage(tmp_path: Path) -> None:
    rng = random.Random(20260101)
    clock = FileClock(tmp_path / "clock")
    now = T0
    clock.set(datetime.fromtimestamp(now, UTC))
    cfg = tmp_path / "nvml.json"
    cfg.write_text(
        json.dumps(
            {
                "node": NODE,
                "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-H100",
                    "nvidia.com/gpu.memory": "81559",
                },
                "capacity": {"nvidia.com/gpu": GPUS},
            }
        )
    )
    pods: list[FakePod] = []
    sock = str(tmp_path / "kubelet.sock")
    server = serve(sock, lambda: list(pods), fake_device_ids(NODE, GPUS))
    podres = PodResourcesClient(sock)
    # The real metering API: stopped, then SIGKILLed during the outage, restarted after.
    receiver = ApiReceiver(tmp_path / "api", NODE)
    (tmp_path / "token").write_text(receiver.token)  # accepted for this node only
    agent = AgentProcess(
        [
            "--node-name", NODE, "--nvml", "fake", "--fake-config", str(cfg),
            "--pod-uid-source", "derived", "--pod-resources-socket", sock,
            "--api-url", receiver.url, "--token-file", str(tmp_path / "token"),
            "--wal-dir", str(tmp_path / "wal"), "--wal-segment-bytes", "16384",
            "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
            "--sample-period", "0.02", "--batch-size", "40",
            "--backoff-base", "0.02", "--backoff-cap", "0.3",
        ],
        {"GPUCLOUD_CLOCK": f"file:{clock.path}"},
        tmp_path / "agent.log",
    )  # fmt: skip

    # (from_second, {gpu uuid: pod name}) in order
    assignments: list[tuple[int, dict[str, str]]] = [(T0, {})]
    counter = 0

    def observed(t: int) -> bool:
        return (agent.state().get("last_second") or 0) >= t

    def sync() -> None:
        wait_for(lambda: observed(now), 30, f"agent to observe second {now}")

    def set_time(t: int) -> None:
        clock.set(datetime.fromtimestamp(t, UTC))

    def change_pods() -> None:
        nonlocal counter, now
        sync()  # the agent saw the last second of the old assignment
        if pods and (len(pods) >= GPUS or rng.random() < 0.5):
            pods.pop(rng.randrange(len(pods)))
        else:
            counter += 1
            pods.append(FakePod("team", f"job-{counter}", f"uid-{counter}", (("main", 1),)))
        held = {g: h.pod for g, h in podres.holders().items()}
        now += 1
        set_time(now)
        assignments.append((now, held))
        sync()  # ... and the first second of the new one

    try:
        pods.append(FakePod("team", "job-0", "uid-0", (("main", 1),)))
        assignments = [(T0, {g: h.pod for g, h in podres.holders().items()})]
        agent.start()
        agent.wait_ready()
        sync()
        kills = 0
        max_backlog = 0
        while now < T0 + SIMULATED_S:
            if OUTAGE[0] <= now < (OUTAGE[0] + OUTAGE[1]) // 2:
                receiver.set_mode("unavailable")
            elif now < OUTAGE[1]:
                receiver.set_mode("down" if now >= OUTAGE[0] else "ok")
            else:
                receiver.set_mode("ok")
            roll = rng.random()
            if roll < 0.08:
                change_pods()
            elif roll < 0.105:
                # SIGKILL at a random moment, time passes while it is dead, restart
                time.sleep(rng.uniform(0, 0.05))
                agent.kill()
                kills += 1
                now += rng.randint(1, 20)
                set_time(now)
                agent.start()
                agent.wait_ready()
                sync()
            else:
                now += rng.randint(1, 10)
                set_time(now)
                if rng.random() < 0.15:
                    sync()
            if OUTAGE[0] <= now < OUTAGE[1]:
                max_backlog = max(max_backlog, agent.state()["wal_backlog"])
        sync()
        pods.clear()  # free every GPU: all open windows close
        held_end = {g: h.pod for g, h in podres.holders().items()}
        assert held_end == {}
        now += 1
        set_time(now)
        assignments.append((now, {}))
        sync()
        receiver.set_mode("ok")

        expected: dict[tuple[str, int], str] = {}
        for (start, held), (end, _) in itertools.pairwise(assignments):
            for gpu, pod in held.items():
                for s in range(start, end):
                    expected[(gpu, s)] = UIDS.uid("team", pod)
        total = len(expected)

        def shipped_seconds() -> int:
            return sum(r["quantity"] for r in receiver.snapshot())

        wait_for(lambda: shipped_seconds() >= total and agent.state()["wal_backlog"] == 0, 60,
                 f"{total} GPU-seconds at the receiver")  # fmt: skip
        got: dict[tuple[str, int], str] = {}
        for r in receiver.snapshot():
            assert r["end"] - r["start"] <= 10
            for s in range(r["start"], r["end"]):
                key = (r["gpu"]["uuid"], s)
                assert key not in got, f"second {key} billed twice"
                got[key] = r["pod"]["uid"]
        assert receiver.conflicts == []
        assert got == expected
        assert kills >= 3 and len(assignments) > 15
        assert max_backlog >= 10  # the outage really held records back in the WAL
    finally:
        agent.stop()
        receiver.close()
        podres.close()
        server.stop(None)
