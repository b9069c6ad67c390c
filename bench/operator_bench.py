"""Operator figures: 200 GPUInstances over 50 fake GPU nodes, apply -> Running.

Prints ``instances_running_p95_s: N`` (goal < 5 s) and ``operator_rss_mib: N`` (goal
< 250). Runs its own test bed cluster (GPUCLOUD_TESTBED_NAME, default
``gpucloud-opbench``) so the shared default cluster is left alone, and deletes it
afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from gpucloud.clock import FileClock
from gpucloud.ledger import EntryKind, open_ledger
from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Binaries, Testbed, parse_node_mix

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "200"))
NODES = os.environ.get("GPUCLOUD_TESTBED_NODES", "NVIDIA-L40S:25:8,NVIDIA-A100-SXM4-80GB:25:8")
NS = "opbench"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def manifests() -> str:
    docs = []
    for i in range(INSTANCES):
        product = "NVIDIA-L40S" if i % 2 else "NVIDIA-A100-SXM4-80GB"
        docs.append(
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "GPUInstance",
                "metadata": {"name": f"i{i:03d}", "namespace": NS},
                "spec": {
                    "gpu": {"product": product, "count": 1 + i % 2},
                    "billing": {"mode": "PayAsYouGo"},
                    "storage": {"quotaGi": 20},
                },
            }
        )
    return yaml.safe_dump_all(docs)


def debug_timeline(tb: Testbed, t0_wall: float, running: dict[str, float]) -> None:
    """When each step happened, relative to the apply (stderr; BENCH_DEBUG=1)."""

    def stamp(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() - t0_wall

    out = json.loads(tb.kubectl("get", "pods", "-n", NS, "-o", "json").stdout)
    created = sorted(stamp(p["metadata"]["creationTimestamp"]) for p in out["items"])
    started = sorted(
        stamp(p["status"]["startTime"]) for p in out["items"] if p["status"].get("startTime")
    )
    for label, values in (("pod created", created), ("pod started", started)):
        if values:
            print(
                f"# {label}: p50 {percentile(values, 50):.1f} s, p95 "
                f"{percentile(values, 95):.1f} s",
                file=sys.stderr,
            )
    values = list(running.values())
    print(f"# instance Running: p50 {percentile(values, 50):.1f} s", file=sys.stderr)


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-opbench")
    tmp = Path(tempfile.mkdtemp(prefix="opbench-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    tb = Testbed(name=name, kubeconfig=kubeconfig, binaries=Binaries.from_cache())
    proc: subprocess.Popen[bytes] | None = None
    try:
        tb.up(nodes=parse_node_mix(NODES))
        install_crds(tb)
        tb.kubectl("apply", "-f", str(REPO / "examples" / "pricebook.yaml"))
        tb.kubectl("create", "namespace", NS, check=False)
        account = {
            "apiVersion": "gpucloud.dev/v1alpha1",
            "kind": "Account",
            "metadata": {"name": "bench"},
            "spec": {"namespaces": [NS], "instanceLimit": 10000},
        }
        tb.apply([account])
        clock = FileClock(tmp / "clock")
        clock.set(datetime(2026, 1, 1, tzinfo=UTC))
        url = f"sqlite:///{tmp / 'ledger.db'}"
        ledger = open_ledger(url, clock=clock)
        ledger.ensure_account("bench", "CNY")
        ledger.post_entry("bench", EntryKind.RECHARGE, 10**9, "bench-fund", at=clock.now())
        ledger.close()
        env = dict(os.environ) | {
            "KUBECONFIG": str(kubeconfig),
            "GPUCLOUD_LEDGER_URL": url,
            "GPUCLOUD_CLOCK": f"file:{clock.path}",
            "GPUCLOUD_OPERATOR_NAMESPACES": NS,
        }
        log = (tmp / "operator.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpucloud_operator.main", "--standalone", "-A"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)  # let the operator list and watch before the burst
        t0, t0_wall = time.monotonic(), time.time()
        tb.kubectl("apply", "-f", "-", input=manifests(), timeout=120)
        running: dict[str, float] = {}
        peak_rss = rss_mib(proc.pid)
        deadline = t0 + 300
        while len(running) < INSTANCES and time.monotonic() < deadline:
            out = json.loads(tb.kubectl("get", "gpuinstances", "-n", NS, "-o", "json").stdout)
            now = time.monotonic()
            for item in out["items"]:
                if (item.get("status") or {}).get("phase") == "Running":
                    running.setdefault(item["metadata"]["name"], now - t0)
            peak_rss = max(peak_rss, rss_mib(proc.pid))
            time.sleep(0.25)
        if len(running) < INSTANCES:
            print(f"# only {len(running)}/{INSTANCES} instances ran", file=sys.stderr)
            return 1
        if os.environ.get("BENCH_DEBUG"):
            debug_timeline(tb, t0_wall, running)
        print(f"instances_running_p95_s: {percentile(list(running.values()), 95):.1f}")
        print(f"operator_rss_mib: {peak_rss:.0f}")
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tb.down()


if __name__ == "__main__":
    sys.exit(main())
