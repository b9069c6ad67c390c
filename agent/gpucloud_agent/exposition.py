"""Prometheus's text exposition format (version 0.0.4), written by hand.

prometheus_client cost the agent 3.4 MiB of memory (issue 20) to print a few dozen
lines. This module prints what its ``generate_latest`` printed for the agent's metrics,
line for line (a test compares the two): ``# HELP`` and ``# TYPE`` per family, counters
named ``<name>_total``, labels sorted by name with ``\\``, ``"`` and newlines escaped,
values as Go prints floats, and a histogram's ``_created`` as a gauge family of its own.
No OpenMetrics and no gzip: Prometheus reads this format from any exporter.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric: ``name`` as Prometheus shows it (a counter's without ``_total``),
    ``kind`` counter, gauge or histogram, and its samples (name suffix, label pairs
    sorted by name, value)."""

    name: str
    kind: str
    help: str
    labels: Sequence[str] = ()
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, values: Sequence[str], value: float) -> None:
        """A sample with these values of ``labels``, in their order."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(values)} label values for {self.labels}")
        self.samples.append(("", tuple(sorted(zip(self.labels, values, strict=True))), value))


class Histogram:
    """A histogram of observations (seconds). Not thread-safe: the agent observes and
    collects under its stats lock."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bucket ``le`` counts value <= le: the first bound not below the value
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def families(self) -> list[Family]:
        hist = Family(self.name, "histogram", self.help)
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            hist.samples.append(("_bucket", (("le", go_float(bound)),), running))
        hist.samples += [("_count", (), running), ("_sum", (), self.sum)]
        created = Family(f"{self.name}_created", "gauge", self.help)
        created.add((), self.created)
        return [hist, created]


def go_float(value: float) -> str:
    """A float as Go's strconv prints it (Prometheus's own exporters; prometheus_client's
    ``floatToGoString``): 12.0, 1.073741824e+09, +Inf."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: Iterable[Family]) -> str:
    out: list[str] = []
    for f in families:
        name = f"{f.name}_total" if f.kind == "counter" else f.name
        out.append(f"# HELP {name} {_escape_help(f.help)}\n# TYPE {name} {f.kind}\n")
        base = name if f.kind == "counter" else f.name
        for suffix, pairs, value in f.samples:
            labels = ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs)
            out.append(f"{base}{suffix}{{{labels}}} " if labels else f"{base}{suffix} ")
            out.append(f"{go_float(value)}\n")
    return "".join(out)
