"""Prometheus metrics built from a snapshot of the agent's stats, and the HTTP endpoints.

The agent updates a `Stats` object under a lock; the collector copies it once per
scrape, so every scrape is consistent and costs the sampling loop nothing.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from gpucloud_agent.exposition import CONTENT_TYPE, Family, Histogram, render

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# What /metrics shows: each collector's families, in order.
Collector = Callable[[], Iterable[Family]]


def _histogram(name: str, doc: str) -> Histogram:
    # AgentCollector renders it from the snapshot, under the stats lock, so a scrape sees
    # it consistent with the other figures
    return Histogram(name, doc, DURATION_BUCKETS)


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
    # the same keys -> when (monotonic seconds) the pod last held the GPU
    allocated_at: dict[tuple[str, str, str, str], float] = field(default_factory=dict)
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

    def forget_allocated_before(self, cutoff: float) -> None:
        """Drop the allocated-seconds series of pods that last held their GPU before
        ``cutoff``: a counter series that ends is what Prometheus expects of a gone pod.
        A pod that comes back starts a new series at 0 (a counter reset to Prometheus,
        which ``rate`` and ``increase`` read as one). Call with the lock held."""
        for key in [k for k, at in self.allocated_at.items() if at < cutoff]:
            del self.allocated[key], self.allocated_at[key]


class AgentCollector:
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

    def __call__(self) -> list[Family]:
        s = self.stats
        with s.lock:
            gpus = list(s.gpus)
            allocated = dict(s.allocated)
            disk = dict(s.disk)
            histograms = [*s.sample_duration.families(), *s.tick_lateness.families()]
            samples, sample_errors = s.samples_total, s.sample_errors_total
        gpu_labels = ("node", "gpu_uuid", "gpu_index", "product")
        util = Family("gpucloud_gpu_utilization_ratio", "gauge",
                      "GPU utilisation (0..1) from NVML.", gpu_labels)  # fmt: skip
        used = Family("gpucloud_gpu_memory_used_bytes", "gauge",
                      "GPU memory in use, from NVML.", gpu_labels)  # fmt: skip
        total = Family("gpucloud_gpu_memory_total_bytes", "gauge",
                       "GPU memory size, from NVML.", gpu_labels)  # fmt: skip
        for g in gpus:
            lv = (s.node, g.uuid, str(g.index), g.product)
            util.add(lv, g.utilization_percent / 100)
            used.add(lv, g.memory_used_bytes)
            total.add(lv, g.memory_total_bytes)
        alloc = Family(
            "gpucloud_gpu_allocated_seconds",
            "counter",
            "GPU-seconds attributed to each pod by this agent since it started.",
            ("namespace", "pod", "gpu_uuid", "product"),
        )
        for key, secs in sorted(allocated.items()):
            alloc.add(key, secs)
        disk_fam = Family(
            "gpucloud_disk_used_bytes",
            "gauge",
            "Bytes used by instance volumes, cloud disks and images on this node.",
            ("kind", "namespace", "name"),
        )
        for key, n in sorted(disk.items()):
            disk_fam.add(key, n)
        backlog = Family("gpucloud_agent_wal_backlog_records", "gauge",
                         "Usage records in the WAL not yet acknowledged.")  # fmt: skip
        backlog.add((), self.wal_backlog())
        ship_err = Family("gpucloud_agent_shipping_errors", "counter",
                          "Failed attempts to ship usage records.")  # fmt: skip
        ship_err.add((), self.shipping_errors())
        samples_fam = Family("gpucloud_agent_samples", "counter", "Samples taken.")
        samples_fam.add((), samples)
        errs = Family("gpucloud_agent_sample_errors", "counter",
                      "Samples skipped because a source did not answer.")  # fmt: skip
        errs.add((), sample_errors)
        dead = Family(
            "gpucloud_agent_dead_letter_records",
            "counter",
            "Usage records the API refused, moved to the dead-letter file, by rule.",
            ("rule",),
        )
        for rule, n in sorted(self.dead_lettered().items()):
            dead.add((rule,), n)
        return [util, used, total, alloc, disk_fam, *histograms, backlog, ship_err,
                samples_fam, errs, dead]  # fmt: skip


def counter_by_result(name: str, help: str, counts: dict[str, int]) -> Family:
    """A counter with one sample per ``result`` (wipes, image copies)."""
    family = Family(name, "counter", help, ("result",))
    for result, n in counts.items():
        family.add((result,), n)
    return family


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Handler(BaseHTTPRequestHandler):
    """/metrics, the probes and /debug/state; any other path is 404."""

    server: MetricsServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        plain = "text/plain; charset=utf-8"
        srv = self.server
        if path == "/metrics":
            families = [f for collect in srv.collectors for f in collect()]
            code, body, ctype = 200, render(families).encode(), CONTENT_TYPE
        elif path == "/healthz":
            code, body, ctype = 200, b"ok\n", plain
        elif path == "/readyz":
            ok = srv.ready()
            code, body, ctype = (200, b"ready\n", plain) if ok else (503, b"not ready\n", plain)
        elif path == "/debug/state":
            code, body, ctype = 200, json.dumps(srv.debug_state()).encode(), "application/json"
        else:
            code, body, ctype = 404, b"not found\n", plain
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the log


class MetricsServer(ThreadingHTTPServer):
    """The agent's HTTP endpoints, one thread per request. ``serve_forever`` sleeps until
    a request or ``shutdown`` comes (socketserver's own wakes twice a second to look
    for a shutdown)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        collectors: list[Collector],
        ready: Callable[[], bool],
        debug_state: Callable[[], dict[str, Any]],
    ) -> None:
        super().__init__(address, _Handler)
        self.collectors = collectors
        self.ready = ready
        self.debug_state = debug_state
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # the interval: unused
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not any(key.fileobj is self._wake_r for key, _ in sel.select()):
                    self.handle_request()  # the listening socket is readable: no wait
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait for it to return."""
        self._wake_w.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()


def serve_http(
    host: str,
    port: int,
    collectors: list[Collector],
    ready: Callable[[], bool],
    debug_state: Callable[[], dict[str, Any]],
) -> MetricsServer:
    """Serve the endpoints on a daemon thread; `.shutdown()` stops it."""
    server = MetricsServer((host, port), collectors, ready, debug_state)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
