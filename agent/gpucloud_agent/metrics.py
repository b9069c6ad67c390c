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
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _histogram(name: str, doc: str) -> Histogram:
    # registry=None: not registered anywhere; AgentCollector yields it from the snapshot,
    # under the stats lock, so a scrape sees it consistent with the other figures.
    return Histogram(name, doc, buckets=DURATION_BUCKETS, registry=None)


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
    sample_duration: Histogram = field(
        default_factory=lambda: _histogram(
            "gpucloud_agent_sample_duration_seconds", "Time to take one sample of all GPUs."
        )
    )
    tick_lateness: Histogram = field(
        default_factory=lambda: _histogram(
            "gpucloud_agent_tick_lateness_seconds",
            "How late each sample started after its scheduled tick.",
        )
    )
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
            histograms = [*s.sample_duration.collect(), *s.tick_lateness.collect()]
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
        yield from (util, used, total, alloc, disk_fam, *histograms, backlog, ship_err)
        yield from (samples_fam, errs, dead)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the log


def agent_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    debug_state: Callable[[], dict[str, Any]],
) -> WSGIApplication:
    """prometheus_client's WSGI app on /metrics (it negotiates OpenMetrics and gzip), beside
    the agent's probes and /debug/state; any other path is 404."""
    metrics = make_wsgi_app(registry)
    plain = "text/plain; charset=utf-8"

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            code, body, ctype = "200 OK", b"ok\n", plain
        elif path == "/readyz":
            ok = ready()
            code = "200 OK" if ok else "503 Service Unavailable"
            body, ctype = (b"ready\n" if ok else b"not ready\n"), plain
        elif path == "/debug/state":
            code, body, ctype = "200 OK", json.dumps(debug_state()).encode(), "application/json"
        else:
            code, body, ctype = "404 Not Found", b"not found\n", plain
        start_response(code, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    debug_state: Callable[[], dict[str, Any]],
) -> WSGIServer:
    """Serve `agent_app` on a daemon thread; `.shutdown()` stops it."""
    server = make_server(
        host, port, agent_app(registry, ready, debug_state), ThreadingWSGIServer, _QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
