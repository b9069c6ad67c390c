"""The chaos test's eyes and oracle: a watch on the namespace's pods that notes, on the
test's file clock, when each pod was created, placed and deleted; and the bill those
records imply, computed without the operator's status or the ledger."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from gpucloud.billing import to_minor
from gpucloud.clock import FileClock
from gpucloud.testing.testbed import Testbed

INSTANCE_LABEL = "gpucloud.dev/instance"
RUN_LABEL = "gpucloud.dev/run"


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class PodRecord:
    """One run's pod as the watch saw it; instants on the test's clock."""

    uid: str
    instance: str
    run: int
    node: str | None = None
    gpus: int = 0
    created: datetime | None = None  # the clock when the watch first saw it
    unscheduled: bool = False  # seen with PodScheduled=False
    placed: datetime | None = None  # the clock when first seen on a node, if it waited
    delay: timedelta | None = None  # the kubelet's start after the creation (its clocks)
    running: datetime | None = None  # the clock when first seen running
    deleted: datetime | None = None
    resource_version: str = ""

    @property
    def start(self) -> datetime | None:
        """When the pod started, on the test's clock: created + the kubelet's delay, but
        not before it was placed if it waited for GPUs, nor after it was seen running."""
        if self.created is None or self.delay is None or self.running is None:
            return None
        start = self.created + max(self.delay, timedelta(0))
        if self.unscheduled and self.placed:
            start = max(start, self.placed)
        return min(start, self.running)


@dataclass
class PodWatch:
    """``kubectl get pods -w`` in a thread. Also checks, at every event, that no node's
    GPUs are given out twice (the pods placed on a node and not ended ask for no more
    than it has)."""

    tb: Testbed
    namespace: str
    clock: FileClock
    capacity: dict[str, int]
    pods: dict[str, PodRecord] = field(default_factory=dict)
    overcommits: list[str] = field(default_factory=list)
    _live: dict[str, tuple[str, int]] = field(default_factory=dict)  # uid -> (node, gpus)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [str(self.tb.bin.kubectl), "--kubeconfig", str(self.tb.kubeconfig)]
        cmd += ["get", "pods", "-n", self.namespace, "-w", "--output-watch-events", "-o", "json"]
        self._proc = subprocess.Popen(
            cmd, env=self.tb.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self._proc.stdout:
            buf += line
            try:
                event, _ = decoder.raw_decode(buf.strip())
            except json.JSONDecodeError:
                continue
            buf = ""
            self._saw(event["type"], event["object"])

    def _saw(self, kind: str, pod: dict[str, Any]) -> None:
        now = self.clock.now()
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        labels = meta.get("labels") or {}
        if INSTANCE_LABEL not in labels:
            return
        with self._lock:
            rec = self.pods.setdefault(
                meta["uid"],
                PodRecord(meta["uid"], labels[INSTANCE_LABEL], int(labels.get(RUN_LABEL, 0))),
            )
            rec.resource_version = meta.get("resourceVersion", "")
            rec.created = rec.created or now
            limits = spec["containers"][0]["resources"]["limits"]
            rec.gpus = int(limits.get("nvidia.com/gpu", 0))
            conds = status.get("conditions") or []
            if any(c["type"] == "PodScheduled" and c["status"] == "False" for c in conds):
                rec.unscheduled = True
            if spec.get("nodeName") and rec.node is None:
                rec.node = spec["nodeName"]
                rec.placed = now
            for cs in status.get("containerStatuses") or []:
                running = (cs.get("state") or {}).get("running")
                if running and rec.delay is None:
                    rec.delay = ts(running["startedAt"]) - ts(meta["creationTimestamp"])
                    rec.running = now
            ended = kind == "DELETED" or status.get("phase") in ("Succeeded", "Failed")
            if (meta.get("deletionTimestamp") or ended) and rec.deleted is None:
                rec.deleted = now
            if rec.node and not ended:
                self._live[rec.uid] = (rec.node, rec.gpus)
            else:
                self._live.pop(rec.uid, None)
            used: dict[str, int] = {}
            for node, gpus in self._live.values():
                used[node] = used.get(node, 0) + gpus
            for node, n in used.items():
                if n > self.capacity.get(node, 0):
                    self.overcommits.append(f"{node}: {n} GPUs at {now}")

    def caught_up(self, listed: list[dict[str, Any]]) -> bool:
        """The watch has seen every pod of ``listed`` (a fresh list) as it is now."""
        with self._lock:
            return all(
                p["metadata"]["uid"] in self.pods
                and self.pods[p["metadata"]["uid"]].resource_version
                == p["metadata"]["resourceVersion"]
                for p in listed
            )

    def records(self) -> list[PodRecord]:
        with self._lock:
            return list(self.pods.values())


def run_charge(price_per_hour: Decimal, gpus: int, seconds: int) -> int:
    """One run, rounded once (its meter's settlement)."""
    return to_minor(Fraction(price_per_hour) * gpus * max(seconds, 0) / 3600)
