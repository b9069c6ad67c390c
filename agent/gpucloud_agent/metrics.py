"""Prometheus metrics built from a snapshot of the agent's stats, and the HTTP endpoints.

The agent updates a `Stats` object under a lock; the collector copies it once per
scrape, so every scrape is consistent and costs the sampling loop nothing.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, acc = [], 0
        for b, c in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            acc += c
            cumulative.append((b, acc))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


@dataclass
class GpuReading:
    uuid: str
    index: int
    product: str
    utilization_percent: int
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass
class Stats:
    node: str
    gpus: list[GpuReading] = field(default_factory=list)
    # (namespace, pod, gpu_uuid, product) -> seconds attributed since start
    allocated: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    # (kind, namespace, name) -> bytes used
    disk: dict[tuple[str, str, str], int] = field(default_factory=dict)
    sample_duration: Histogram = field(default_factory=Histogram)
    tick_lateness: Histogram = field(default_factory=Histogram)
    lateness_recent: deque[float] = field(default_factory=lambda: deque(maxlen=3600))
    samples_total: int = 0
    sample_errors_total: int = 0
    last_second: int | None = None
    nvml_ok: bool = False
    podresources_ok: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class AgentCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        wal_backlog: Callable[[], int],
        shipping_errors: Callable[[], int],
        dead_lettered: Callable[[], dict[str, int]] = dict,
    ):
        self.stats = stats
        self.wal_backlog = wal_backlog
        self.shipping_errors = shipping_errors
        self.dead_lettered = dead_lettered

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        with s.lock:
            gpus = list(s.gpus)
            allocated = dict(s.allocated)
            disk = dict(s.disk)
            duration = s.sample_duration.family(
                "gpucloud_agent_sample_duration_seconds", "Time to take one sample of all GPUs."
            )
            lateness = s.tick_lateness.family(
                "gpucloud_agent_tick_lateness_seconds",
                "How late each sample started after its scheduled tick.",
            )
            samples, sample_errors = s.samples_total, s.sample_errors_total
        labels = ["node", "gpu_uuid", "gpu_index", "product"]
        util = GaugeMetricFamily(
            "gpucloud_gpu_utilization_ratio", "GPU utilisation (0..1) from NVML.", labels=labels
        )
        used = GaugeMetricFamily(
            "gpucloud_gpu_memory_used_bytes", "GPU memory in use, from NVML.", labels=labels
        )
        total = GaugeMetricFamily(
            "gpucloud_gpu_memory_total_bytes", "GPU memory size, from NVML.", labels=labels
        )
        for g in gpus:
            lv = [s.node, g.uuid, str(g.index), g.product]
            util.add_metric(lv, g.utilization_percent / 100)
            used.add_metric(lv, g.memory_used_bytes)
            total.add_metric(lv, g.memory_total_bytes)
        alloc = CounterMetricFamily(
            "gpucloud_gpu_allocated_seconds",
            "GPU-seconds attributed to each pod by this agent since it started.",
            labels=["namespace", "pod", "gpu_uuid", "product"],
        )
        for key, secs in sorted(allocated.items()):
            alloc.add_metric(list(key), secs)
        disk_fam = GaugeMetricFamily(
            "gpucloud_disk_used_bytes",
            "Bytes used by instance volumes, cloud disks and images on this node.",
            labels=["kind", "namespace", "name"],
        )
        for key, n in sorted(disk.items()):
            disk_fam.add_metric(list(key), n)
        backlog = GaugeMetricFamily(
            "gpucloud_agent_wal_backlog_records", "Usage records in the WAL not yet acknowledged."
        )
        backlog.add_metric([], self.wal_backlog())
        ship_err = CounterMetricFamily(
            "gpucloud_agent_shipping_errors", "Failed attempts to ship usage records."
        )
        ship_err.add_metric([], self.shipping_errors())
        dead = CounterMetricFamily(
            "gpucloud_agent_dead_letter_records",
            "Usage records the API refused, moved to the dead-letter file, by rule.",
            labels=["rule"],
        )
        for rule, n in sorted(self.dead_lettered().items()):
            dead.add_metric([rule], n)
        samples_fam = CounterMetricFamily("gpucloud_agent_samples", "Samples taken.")
        samples_fam.add_metric([], samples)
        errs = CounterMetricFamily(
            "gpucloud_agent_sample_errors", "Samples skipped because a source did not answer."
        )
        errs.add_metric([], sample_errors)
        yield from (util, used, total, alloc, disk_fam, duration, lateness, backlog, ship_err)
        yield from (samples_fam, errs, dead)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    debug_state: Callable[[], dict[str, Any]],
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(
                    200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
                )
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            elif path == "/debug/state":
                self._send(200, json.dumps(debug_state()).encode(), "application/json")
            else:
                self._send(404, b"not found\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
