"""The metering path end to end on the test bed: a GPU pod placed by the real scheduler
-> the project's pod-resources server for that node -> the agent (fake NVML following the
Node's labels) -> the real metering API -> GPU-seconds in the ledger, for that pod."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import yaml
from gpucloud_agent.fake_nvml import fake_gpu_uuid, fake_utilization_percent
from sqlalchemy import text

from gpucloud.api.testserver import ApiProcess, agent_token, free_port
from gpucloud.ledger import open_ledger
from gpucloud.testing.kube import get_json, wait_for
from gpucloud.testing.testbed import Testbed

pytestmark = pytest.mark.e2e
NODE = "gpu-l40s-0"


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpucloud_agent.main", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def metering(testbed: Testbed, tmp_path: Path) -> Iterator[tuple[ApiProcess, int]]:
    api = ApiProcess(tmp_path / "api", nodes=[NODE]).start()
    socket = tmp_path / "pod-resources.sock"
    token = tmp_path / "token"
    token.write_text(agent_token(NODE))
    metrics_port = free_port()
    kube = ["--kubeconfig", str(testbed.kubeconfig)]
    server = spawn(
        ["serve-podresources", "--node-name", NODE, "--socket", str(socket), *kube],
        tmp_path / "podresources.log",
    )
    agent = spawn(
        [
            "run",
            "--node-name",
            NODE,
            "--nvml",
            "fake",
            "--fake-from-kube",
            *kube,
            "--pod-uid-source",
            "kube",
            "--pod-resources-socket",
            str(socket),
            "--api-url",
            api.url,
            "--token-file",
            str(token),
            "--wal-dir",
            str(tmp_path / "wal"),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(metrics_port),
            "--sample-period",
            "1",
        ],
        tmp_path / "agent.log",
    )
    try:
        yield api, metrics_port
    finally:
        for proc in (agent, server):
            proc.terminate()
            proc.wait(10)
        api.stop()


def test_gpu_pod_is_metered_into_the_ledger(
    testbed: Testbed, namespace: str, metering: tuple[ApiProcess, int]
) -> None:
    api, metrics_port = metering
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainer", "namespace": namespace},
        "spec": {
            "nodeName": NODE,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ],
        },
    }
    testbed.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    wait_for(
        lambda: (
            get_json(testbed, "pod", "trainer", "-n", namespace)["status"].get("phase") == "Running"
        ),
        timeout=60,
        what="the pod to run",
    )
    uid = get_json(testbed, "pod", "trainer", "-n", namespace)["metadata"]["uid"]

    # The agent attributes both GPUs to the pod, second by second.
    def allocated() -> float:
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.TransportError:  # the agent is still starting
            return 0.0
        total = 0.0
        for line in text.splitlines():
            if line.startswith("gpucloud_gpu_allocated_seconds_total{") and (
                f'namespace="{namespace}"' in line and 'pod="trainer"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    wait_for(lambda: allocated() >= 4, timeout=60, what="the agent to attribute GPU-seconds")
    gpu_labels = re.findall(
        r'gpucloud_gpu_allocated_seconds_total\{[^}]*pod="trainer"[^}]*\}',
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text,
    )
    assert len({re.search(r'gpu_uuid="([^"]+)"', s).group(1) for s in gpu_labels}) == 2

    # Windows of up to 10 s are shipped to the API and land in the ledger for this pod.
    ledger = open_ledger(api.database_url)
    try:

        def gpu_seconds() -> int:
            rows = ledger.usage_summary(namespace=namespace, kind="gpu_time")
            return sum(r.gpu_seconds for r in rows)

        wait_for(lambda: gpu_seconds() >= 20, timeout=90, what="usage to reach the ledger")
        # No meter is open for this pod, so its usage waits unrated, owned by its UID.
        mine = [u for u in ledger.unrated_usage(limit=100000) if u.namespace == namespace]
        assert mine and {u.owner for u in mine} == {uid}
        assert {u.node for u in mine} == {NODE}
        assert all(0 < u.end - u.start <= 10 for u in mine)
        # Each window carries what its GPU did (idle detection): the busiest sampled
        # second of the fake NVML, whose utilization is a known function of the second.
        with ledger.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT subject, start_s, end_s, util_max, memory_max, samples "
                    "FROM ledger_usage WHERE owner = :uid"
                ),
                {"uid": uid},
            ).all()
        assert rows
        assert all(r.samples is not None and 1 <= r.samples <= r.end_s - r.start_s for r in rows)
        full = [r for r in rows if r.samples == r.end_s - r.start_s]
        assert full, "some windows were sampled every second"
        gpu_index = {fake_gpu_uuid(NODE, i): i for i in range(16)}
        for r in full:
            # a reading may fall in the next second: each sample is f(s) or f(s + 1)
            f = [fake_utilization_percent(gpu_index[r.subject], s)
                 for s in range(r.start_s, r.end_s + 1)]  # fmt: skip
            lowest = max(min(a, b) for a, b in pairwise(f))
            assert lowest <= r.util_max <= max(f), r
    finally:
        ledger.close()
