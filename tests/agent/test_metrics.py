from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_testkit import AgentProcess, Receiver, free_port, wait_for
from gpucloud_agent.exposition import CONTENT_TYPE, Family, Histogram, render
from gpucloud_agent.metrics import AgentCollector, GpuReading, Stats, serve_http
from gpucloud_agent.podresources.fake_server import FakePod, fake_device_ids, serve
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from gpucloud.testing import prometheus
from gpucloud.testing.prometheus import Prometheus

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
NODE = "node-metrics"


def sample_stats() -> Stats:
    s = Stats(node="n1")
    s.gpus = [GpuReading("GPU-abc", 0, "T4", 42, 1 << 30, 16 << 30)]
    s.allocated[("team", "job", "GPU-abc", "T4")] = 12
    s.disk[("cloud_disk", "team", "d1")] = 4096
    s.sample_duration.observe(0.002)
    s.tick_lateness.observe(0.0004)
    return s


def client_text(families: list[Family]) -> str:
    """What prometheus_client's generate_latest prints for the same families."""

    class Registry:
        def collect(self) -> list[Metric]:
            out = []
            for f in families:
                metric = Metric(f.name, f.help, f.kind)
                base = f"{f.name}_total" if f.kind == "counter" else f.name
                for suffix, pairs, value in f.samples:
                    metric.add_sample(base + suffix, dict(pairs), value)
                out.append(metric)
            return out

    return generate_latest(Registry()).decode()  # type: ignore[arg-type]


def test_exposition_from_a_snapshot() -> None:
    families = AgentCollector(sample_stats(), lambda: 7, lambda: 3, lambda: {"wrong_node": 2})()
    text = render(families)
    # line for line what prometheus_client printed before issue 20
    assert text == client_text(families)
    assert (
        'gpucloud_gpu_utilization_ratio{gpu_index="0",gpu_uuid="GPU-abc",node="n1",'
        'product="T4"} 0.42' in text
    )
    assert (
        'gpucloud_gpu_allocated_seconds_total{gpu_uuid="GPU-abc",namespace="team",pod="job",'
        'product="T4"} 12.0' in text
    )
    assert "gpucloud_agent_wal_backlog_records 7.0" in text
    assert "gpucloud_agent_shipping_errors_total 3.0" in text
    assert 'gpucloud_agent_sample_duration_seconds_bucket{le="0.0025"} 1.0' in text
    assert 'gpucloud_agent_sample_duration_seconds_bucket{le="+Inf"} 1.0' in text
    assert "gpucloud_agent_sample_duration_seconds_count 1.0" in text
    assert "# TYPE gpucloud_agent_sample_duration_seconds_created gauge" in text
    assert 'gpucloud_gpu_memory_used_bytes{gpu_index="0",gpu_uuid="GPU-abc",node="n1",' in text
    assert 'product="T4"} 1.073741824e+09' in text
    assert 'gpucloud_agent_dead_letter_records_total{rule="wrong_node"} 2.0' in text


_label_values = st.text(max_size=8) | st.sampled_from(['a"b', "c\\d", "e\nf", "ünï"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_label_values, _label_values), max_size=4),
    st.text(max_size=20),
    st.lists(st.floats(allow_nan=False) | st.integers(0, 2**60), min_size=1, max_size=4),
    st.sampled_from(["counter", "gauge"]),
)
def test_escaping_and_numbers_as_prometheus_client_prints_them(
    labels: list[tuple[str, str]], help: str, values: list[float], kind: str
) -> None:
    family = Family("x_bytes", kind, help, ("zeta", "alpha"))
    for i, pair in enumerate(labels):
        family.add(pair, values[i % len(values)])
    hist = Histogram("h_seconds", help, (0.001, 0.5, 1.0))
    for v in values:
        hist.observe(abs(v) % 2)
    families = [family, *hist.families()]
    assert render(families) == client_text(families)


def test_http_endpoints() -> None:
    collectors = [AgentCollector(sample_stats(), lambda: 7, lambda: 3)]
    ready = [False]
    server = serve_http("127.0.0.1", 0, collectors, lambda: ready[0], lambda: {"samples_total": 5})
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"] == CONTENT_TYPE
        assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "gpucloud_agent_wal_backlog_records 7.0" in metrics.text
        # a Prometheus that prefers OpenMetrics gets the text format, which it reads too
        om = httpx.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"] == CONTENT_TYPE and om.text == metrics.text
        health = httpx.get(f"{base}/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
        not_ready = httpx.get(f"{base}/readyz")
        assert (not_ready.status_code, not_ready.text) == (503, "not ready\n")
        ready[0] = True
        now_ready = httpx.get(f"{base}/readyz")
        assert (now_ready.status_code, now_ready.text) == (200, "ready\n")
        state = httpx.get(f"{base}/debug/state?x=1")
        assert state.headers["content-type"] == "application/json"
        assert state.json() == {"samples_total": 5}
        missing = httpx.get(f"{base}/nope")
        assert (missing.status_code, missing.text) == (404, "not found\n")
    finally:
        t0 = time.monotonic()
        server.shutdown()  # wakes the serving thread at once: it does not poll
        assert time.monotonic() - t0 < 0.4
        server.server_close()


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")
def test_promtool_accepts_the_metrics() -> None:
    text = render(AgentCollector(sample_stats(), lambda: 0, lambda: 0)())
    out = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert out.stdout.strip() == b"" and out.stderr.strip() == b"", "promtool lint findings"


@pytest.fixture
def running_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    cfg = tmp_path / "nvml.yaml"
    cfg.write_text(
        f"node: {NODE}\nlabels:\n  nvidia.com/gpu.product: NVIDIA-L40S\n"
        "  nvidia.com/gpu.memory: '46068'\ncapacity:\n  nvidia.com/gpu: 2\n"
    )
    pods = [FakePod("team", "trainer", "uid-t", (("main", 1),))]
    sock = str(tmp_path / "kubelet.sock")
    server = serve(sock, lambda: pods, fake_device_ids(NODE, 2))
    receiver = Receiver()
    disk = tmp_path / "disk" / "instances" / "team" / "trainer"
    disk.mkdir(parents=True)
    (disk / "data").write_bytes(b"x" * 100_000)
    agent = AgentProcess(
        [
            "--node-name", NODE, "--nvml", "fake", "--fake-config", str(cfg),
            "--pod-uid-source", "derived", "--pod-resources-socket", sock,
            "--api-url", receiver.url, "--token-file", str(tmp_path / "none"),
            "--wal-dir", str(tmp_path / "wal"), "--disk-root", str(tmp_path / "disk"),
            "--disk-metrics-interval", "0.2",
            "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
            "--sample-period", "0.2",
        ],
        {},
        tmp_path / "agent.log",
    )  # fmt: skip
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()
        receiver.close()
        server.stop(None)


@pytest.mark.slow
@pytest.mark.skipif(prometheus.BINARY is None, reason="prometheus not installed")
def test_prometheus_scrapes_the_running_agent(tmp_path: Path, running_agent: AgentProcess) -> None:
    # the live endpoint also passes promtool
    wait_for(lambda: "gpucloud_disk_used_bytes{" in httpx.get(running_agent.url("/metrics")).text,
             30, "disk gauge")  # fmt: skip
    live = httpx.get(running_agent.url("/metrics")).content
    out = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=live, capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()

    with Prometheus(tmp_path, {"agent": f"127.0.0.1:{running_agent.metrics_port}"}) as prom:
        query = prom.query
        result = wait_for(
            lambda: query('gpucloud_gpu_allocated_seconds_total{pod="trainer"} > 0'), 90,
            "Prometheus to have scraped the allocated-seconds counter",
        )  # fmt: skip
        assert result[0]["metric"]["namespace"] == "team"
        assert result[0]["metric"]["product"] == "NVIDIA-L40S"
        util = wait_for(lambda: query("gpucloud_gpu_utilization_ratio"), 30, "utilisation")
        assert {u["metric"]["gpu_index"] for u in util} == {"0", "1"}
        assert all(0 <= float(u["value"][1]) <= 1 for u in util)
        disk = wait_for(
            lambda: query('gpucloud_disk_used_bytes{kind="instance_volume"}'), 30, "disk"
        )
        assert float(disk[0]["value"][1]) >= 100_000
        up = json.dumps(query("up"))
        assert '"1"' in up
