"""Attribution of GPU-seconds to pods and windowing into usage records (pure, no I/O).

A sample taken during wall second `s` that sees pod P holding GPU g attributes second
`s` of g to P. Per GPU the meter keeps a cursor (the first second not yet attributed)
and the last holder. Seconds between two samples (sampling jitter, a restart) are
bridged to the holder only when the same pod (same UID) held the GPU at both ends: a
pod keeps its devices for its whole life, so it held them in between. When the holder
changed inside a gap, the moment of the change is unknown and the gap is billed to no
one (the fair choice for customers).

Attributed seconds accumulate in an open window per GPU, closed into a record when it
reaches 10 s, when the holder changes, or at a gap that is not bridged.

Each window also keeps what the GPU did in its sampled seconds (the busiest second's
utilization and memory, and how many seconds were sampled): the record's ``activity``,
for idle-GPU detection. Bridged seconds were not sampled and add nothing to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpucloud.usage_rules import MAX_GPU_WINDOW_S, UsageKind
from gpucloud_agent.records import Activity, GPURef, PodRef, UsageRecord

# One sample of a GPU: (utilization percent, memory used in bytes).
Sample = tuple[int, int]


@dataclass
class Window:
    pod: PodRef
    start: int
    end: int  # exclusive
    util_max: int = 0
    memory_max: int = 0
    samples: int = 0

    def sampled(self, sample: Sample) -> None:
        self.util_max = max(self.util_max, sample[0])
        self.memory_max = max(self.memory_max, sample[1])
        self.samples += 1

    def activity(self) -> Activity | None:
        if not self.samples:
            return None
        return Activity(
            util_max_percent=min(100, max(0, self.util_max)),
            memory_max_bytes=max(0, self.memory_max),
            samples=self.samples,
        )


@dataclass
class GpuCursor:
    gpu: GPURef
    next: int  # first second not yet attributed
    holder: PodRef | None
    open: Window | None = None


@dataclass(frozen=True)
class Attributed:
    gpu: GPURef
    pod: PodRef
    seconds: int


class Meter:
    def __init__(
        self, node: str, max_window_s: int = MAX_GPU_WINDOW_S, max_bridge_s: int = 3600
    ) -> None:
        if not 1 <= max_window_s <= MAX_GPU_WINDOW_S:
            raise ValueError(f"max_window_s must be in 1..{MAX_GPU_WINDOW_S}")
        self.node = node
        self.max_window_s = max_window_s
        self.max_bridge_s = max_bridge_s
        self.cursors: dict[str, GpuCursor] = {}

    def _record(self, gpu: GPURef, w: Window) -> UsageRecord:
        return UsageRecord(
            kind=UsageKind.GPU_TIME,
            node=self.node,
            start=w.start,
            end=w.end,
            quantity=w.end - w.start,
            gpu=gpu,
            pod=w.pod,
            activity=w.activity(),
        )

    def _close(self, cur: GpuCursor, out: list[UsageRecord]) -> None:
        if cur.open is not None:
            out.append(self._record(cur.gpu, cur.open))
            cur.open = None

    def _add(
        self,
        cur: GpuCursor,
        pod: PodRef,
        start: int,
        end: int,
        out: list[UsageRecord],
        sample: Sample | None = None,
    ) -> None:
        """Attribute [start, end) to pod, cutting windows at max_window_s; ``sample`` is
        what the GPU did in the last second (end - 1), the one sampled."""
        w = cur.open
        if w is not None and (w.pod != pod or w.end != start):
            self._close(cur, out)
            w = None
        if w is None:
            w = cur.open = Window(pod, start, start)
        while True:
            w.end = min(end, w.start + self.max_window_s)
            if sample is not None and w.end == end:
                w.sampled(sample)
            if w.end - w.start < self.max_window_s:
                break
            self._close(cur, out)
            if w.end == end:
                break
            w = cur.open = Window(pod, w.end, w.end)

    def observe(
        self,
        second: int,
        holders: dict[GPURef, PodRef | None],
        samples: dict[str, Sample] | None = None,
    ) -> tuple[list[UsageRecord], list[Attributed]]:
        """One sample taken during `second`: GPU -> holder (None: free), and by GPU UUID
        what each GPU did in it. Closed records and the seconds newly attributed (for the
        allocated-seconds counter)."""
        out: list[UsageRecord] = []
        added: list[Attributed] = []
        for gpu, pod in holders.items():
            cur = self.cursors.get(gpu.uuid)
            if cur is None:
                cur = self.cursors[gpu.uuid] = GpuCursor(gpu, second, None)
            if second < cur.next:
                continue  # this second is already attributed (two samples in one second)
            if pod is None:
                self._close(cur, out)
            else:
                gap = second - cur.next
                bridge = cur.holder == pod and gap <= self.max_bridge_s
                start = cur.next if bridge else second
                if not bridge:
                    self._close(cur, out)
                sample = samples.get(gpu.uuid) if samples is not None else None
                self._add(cur, pod, start, second + 1, out, sample)
                added.append(Attributed(gpu, pod, second + 1 - start))
            cur.next = second + 1
            cur.holder = pod
        return out, added

    # --- persistence (the cursor lives in the WAL) ---

    def state(self) -> dict[str, Any]:
        def pod_json(p: PodRef | None) -> Any:
            return None if p is None else p.to_json()

        return {
            uuid: {
                "gpu": c.gpu.to_json(),
                "next": c.next,
                "holder": pod_json(c.holder),
                "open": None
                if c.open is None
                else {
                    "pod": pod_json(c.open.pod),
                    "start": c.open.start,
                    "end": c.open.end,
                    "activity": [c.open.util_max, c.open.memory_max, c.open.samples],
                },
            }
            for uuid, c in self.cursors.items()
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.cursors = {}
        for uuid, c in state.items():
            o = c.get("open")
            self.cursors[uuid] = GpuCursor(
                gpu=GPURef(**c["gpu"]),
                next=int(c["next"]),
                holder=None if c["holder"] is None else PodRef(**c["holder"]),
                open=None if o is None else _window(o),
            )


def _window(o: dict[str, Any]) -> Window:
    """An open window from the WAL (one written before activity was kept has none)."""
    util, memory, samples = o.get("activity") or (0, 0, 0)
    return Window(PodRef(**o["pod"]), o["start"], o["end"], util, memory, samples)
