"""The agent: samples every period, meters GPU-seconds and hourly disk use into the WAL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpucloud.clock import Clock, monotonic
from gpucloud.usage_rules import HOUR_S, UsageKind
from gpucloud_agent import disk
from gpucloud_agent.devices import DeviceMap
from gpucloud_agent.meter import Meter
from gpucloud_agent.metrics import GpuReading, Stats, quantile
from gpucloud_agent.nvml import Nvml
from gpucloud_agent.podresources.client import DeviceHolder
from gpucloud_agent.pods import PodUidResolver
from gpucloud_agent.records import GPURef, PodRef, UsageRecord
from gpucloud_agent.schedule import Ticker
from gpucloud_agent.wal import Wal

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    node: str
    sample_period_s: float = 1.0
    disk_root: str | None = None
    disk_metrics_interval_s: float = 300.0
    # what this agent meters under disk_root: a node's agent its node-local instances/
    # and images/; the shared-storage meter the cloud disks every node sees (docs/agent.md)
    disk_kinds: frozenset[UsageKind] = frozenset(disk.LAYOUT)
    # how long a pod's allocated-seconds series outlives the pod's last second on a GPU:
    # kept forever, series of pods long gone would grow memory and every scrape without
    # bound; by then Prometheus has scraped the final value many times (docs/agent.md)
    series_retention_s: float = 3600.0


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        nvml: Nvml,
        holders: Callable[[], dict[str, DeviceHolder]],
        resolver: PodUidResolver,
        wal: Wal,
        clock: Clock,
        monotonic: Callable[[], float] = monotonic,
    ) -> None:
        self.config = config
        self.monotonic = monotonic  # series retention: real elapsed time, whatever the clock
        self.nvml = nvml
        self.holders = holders
        self.resolver = resolver
        self.wal = wal
        self.clock = clock
        self.stats = Stats(node=config.node)
        self.meter = Meter(config.node)
        self.devices = nvml.devices()
        self.stats.nvml_ok = True
        self.device_map = DeviceMap(self.devices, {d.index: nvml.mig_devices(d.index)
                                                   for d in self.devices})  # fmt: skip
        self._pod_refs: dict[tuple[str, str, str], PodRef] = {}
        state = wal.state or {}
        if "meter" in state:
            self.meter.restore(state["meter"])
        # the start of the first hour whose disk use is not yet recorded
        self.disk_cursor: int | None = state.get("disk_hour")
        self.ticker: Ticker | None = None
        self._stop = threading.Event()

    # --- GPU sampling ---

    def _pod_ref(self, h: DeviceHolder) -> PodRef | None:
        uid = self.resolver.uid(h.namespace, h.pod)
        if uid is None:
            return None
        key = (h.namespace, h.pod, uid)
        ref = self._pod_refs.get(key)
        if ref is None:
            ref = self._pod_refs[key] = PodRef(namespace=h.namespace, name=h.pod, uid=uid)
        return ref

    def sample_once(self, lateness_s: float = 0.0) -> list[UsageRecord]:
        t0 = time.perf_counter()
        second = int(self.clock.now().timestamp())
        readings = [
            GpuReading(
                d.uuid,
                d.index,
                d.product,
                self.nvml.utilization_percent(d.index),
                self.nvml.memory_used_bytes(d.index),
                d.memory_total_bytes,
            )
            for d in self.devices
        ]
        if not self.devices:
            # nothing to attribute (a CPU node, or the shared-storage meter): pod-resources
            # is not asked, and may not even be mounted
            with self.stats.lock:
                self.stats.podresources_ok = True
                self.stats.samples_total += 1
                self.stats.last_second = second
            return []
        try:
            held = self.holders()
        except Exception as exc:  # the socket is down: no observation this tick; bridged later
            log.warning("pod-resources unavailable: %s", exc)
            with self.stats.lock:
                self.stats.sample_errors_total += 1
                self.stats.gpus = readings
            return []
        known = [c.gpu for c in self.meter.cursors.values()]
        observed: dict[GPURef, PodRef | None] = {
            gpu: None if h is None else self._pod_ref(h)
            for gpu, h in self.device_map.observe(held, known).items()
        }
        # what each device did (idle detection); a time-sliced replica (<uuid>::<n>)
        # shows the readings of its GPU
        by_uuid = {g.uuid: (g.utilization_percent, g.memory_used_bytes) for g in readings}
        samples = {
            gpu.uuid: by_uuid[base]
            for gpu in observed
            if (base := gpu.uuid.split("::", 1)[0]) in by_uuid
        }
        records, added = self.meter.observe(second, observed, samples)
        self.wal.append([r.to_json() for r in records], {"meter": self.meter.state()})
        now = self.monotonic()
        elapsed = time.perf_counter() - t0
        with self.stats.lock:
            s = self.stats
            s.gpus = readings
            s.podresources_ok = True
            s.samples_total += 1
            s.last_second = second
            s.sample_duration.observe(elapsed)
            s.tick_lateness.observe(lateness_s)
            s.lateness_recent.append(lateness_s)
            for a in added:
                key = (a.pod.namespace, a.pod.name, a.gpu.uuid, a.gpu.product)
                s.allocated[key] = s.allocated.get(key, 0) + a.seconds
                s.allocated_at[key] = now
            # only after a sample that saw every holder: an outage of pod-resources
            # forgets no running pod
            s.forget_allocated_before(now - self.config.series_retention_s)
        return records

    # --- disk ---

    def disk_tick(self, force_measure: bool = False) -> list[UsageRecord]:
        """Emit the disk records of an hour that has ended; refresh disk gauges."""
        root = self.config.disk_root
        if root is None:
            return []
        hour = int(self.clock.now().timestamp()) // HOUR_S * HOUR_S
        if self.disk_cursor is None or hour < self.disk_cursor:
            if self.disk_cursor is not None:
                # the clock went back (a restored log from another clock, a stepped
                # clock): waiting for it to catch up would meter nothing for hours
                log.warning("clock is before the disk cursor %d: restarting at %d",
                            self.disk_cursor, hour)  # fmt: skip
            self.disk_cursor = hour  # first start: the hour in progress is the first one
            self.wal.append([], {"disk_hour": hour})
        records: list[UsageRecord] = []
        if hour > self.disk_cursor or force_measure:
            usage = disk.measure(root, self.config.disk_kinds)
            with self.stats.lock:
                self.stats.disk = {(v.kind.value, v.namespace, v.name): n for v, n in usage.items()}
            if hour > self.disk_cursor:
                # measured now, at the end of the hour just over. Hours missed while the
                # agent was down are not billed: nothing measured them.
                start = hour - HOUR_S
                records = [
                    UsageRecord(
                        kind=UsageKind(v.kind),
                        node=self.config.node,
                        start=start,
                        end=hour,
                        quantity=n,
                        volume=v.volume_id,
                    )
                    for v, n in usage.items()
                ]
                self.disk_cursor = hour
                self.wal.append([r.to_json() for r in records], {"disk_hour": hour})
        return records

    def _disk_loop(self) -> None:
        last_measure = -1e9
        while not self._stop.wait(min(self.config.sample_period_s, 1.0)):
            due = time.monotonic() - last_measure >= self.config.disk_metrics_interval_s
            try:
                self.disk_tick(force_measure=due)
            except Exception:
                log.exception("disk metering failed")
            if due:
                last_measure = time.monotonic()

    # --- loop ---

    def run(self) -> None:
        disk_thread = threading.Thread(target=self._disk_loop, name="disk", daemon=True)
        disk_thread.start()
        self.ticker = Ticker(self.config.sample_period_s)
        lateness = 0.0
        while not self._stop.is_set():
            try:
                self.sample_once(lateness)
            except Exception:
                log.exception("sample failed")
                with self.stats.lock:
                    self.stats.sample_errors_total += 1
            nxt = self.ticker.next()
            if nxt is None:
                break
            lateness = nxt

    def stop(self) -> None:
        self._stop.set()
        if self.ticker is not None:
            self.ticker.stop()

    def ready(self) -> bool:
        return self.stats.nvml_ok and self.stats.podresources_ok

    def debug_state(self) -> dict[str, Any]:
        with self.stats.lock:
            recent = list(self.stats.lateness_recent)
            last_second = self.stats.last_second
            samples = self.stats.samples_total
        return {
            "node": self.config.node,
            "last_second": last_second,
            "samples_total": samples,
            "wal_backlog": self.wal.backlog,
            "disk_cursor": self.disk_cursor,
            "tick_lateness_p50_s": quantile(recent, 0.5),
            "tick_lateness_p99_s": quantile(recent, 0.99),
            "tick_lateness_max_s": max(recent) if recent else None,
            "skipped_ticks": self.ticker.skipped if self.ticker else 0,
        }
