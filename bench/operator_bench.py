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
import threading
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def api_requests(tb: Testbed) -> dict[str, float]:
    """The API server's request counters by verb and resource (its /metrics)."""
    text = tb.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line[len("apiserver_request_total{") :].rsplit("} ", 1)
        tags = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
        key = f"{tags.get('verb', '').strip(chr(34))} {tags.get('resource', '').strip(chr(34))}"
        out[key] = out.get(key, 0.0) + float(value)
    return out


def debug_requests(before: dict[str, float], after: dict[str, float]) -> None:
    """API requests during the burst (all clients; watches count once), busiest first."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    top = sorted(((v, k) for k, v in delta.items() if v >= INSTANCES / 4), reverse=True)
    total = sum(v for v in delta.values() if v > 0)
    print(f"# API requests during the burst: {total:.0f} in all", file=sys.stderr)
    for v, k in top:
        print(f"#   {v:6.0f} {k}", file=sys.stderr)


class PhaseWatch:
    """When each instance was first seen Running, from one ``kubectl get -w``: polling
    with a kubectl per look would spend much of a small machine's CPU on measuring."""

    def __init__(self, tb: Testbed) -> None:
        cmd = [str(tb.bin.kubectl), "--kubeconfig", str(tb.kubeconfig), "get", "gpuinstances"]
        cmd += [
            "-n",
            NS,
            "-w",
            "--no-headers",
            "-o",
            "custom-columns=N:.metadata.name,P:.status.phase",
        ]
        self.proc = subprocess.Popen(cmd, env=tb.env(), stdout=subprocess.PIPE, text=True)
        self.t0 = time.monotonic()
        self.running: dict[str, float] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            name, _, phase = line.strip().partition(" ")
            if phase.strip() == "Running":
                self.running.setdefault(name, time.monotonic() - self.t0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def debug_timeline(tb: Testbed, t0_wall: float, running: dict[str, float]) -> None:
    """When each step happened, relative to the apply (stderr; BENCH_DEBUG=1)."""

    def stamp(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() - t0_wall

    claims = json.loads(
        tb.kubectl("get", "pvc", "-n", NS, "-o", "json", "--show-managed-fields").stdout
    )["items"]
    # when the PV controller wrote the claim's Bound status (its managedFields entry)
    bound = sorted(
        stamp(f["time"])
        for c in claims
        for f in c["metadata"].get("managedFields") or []
        if f.get("manager") == "kube-controller-manager" and f.get("subresource") == "status"
    )
    claimed = sorted(stamp(c["metadata"]["creationTimestamp"]) for c in claims)
    instances = json.loads(tb.kubectl("get", "gpuinstances", "-n", NS, "-o", "json").stdout)
    applied = sorted(stamp(i["metadata"]["creationTimestamp"]) for i in instances["items"])
    out = json.loads(tb.kubectl("get", "pods", "-n", NS, "-o", "json").stdout)
    created = sorted(stamp(p["metadata"]["creationTimestamp"]) for p in out["items"])
    started = sorted(
        stamp(p["status"]["startTime"]) for p in out["items"] if p["status"].get("startTime")
    )
    for label, values in (
        ("instance created", applied),
        ("claim created", claimed),
        ("claim bound", bound),
        ("pod created", created),
        ("pod started", started),
    ):
        if values:
            print(
                f"# {label}: p50 {percentile(values, 50):.1f} s, p95 "
                f"{percentile(values, 95):.1f} s",
                file=sys.stderr,
            )
    values = list(running.values())
    print(f"# instance Running: p50 {percentile(values, 50):.1f} s", file=sys.stderr)
    # the apply itself (one kubectl, object after object) is part of the figure above;
    # this is the time from each instance's creation (1 s resolution) to its Running
    since = [
        running[i["metadata"]["name"]] - stamp(i["metadata"]["creationTimestamp"])
        for i in instances["items"]
        if i["metadata"]["name"] in running
    ]
    print(
        f"# instance created -> Running: p50 {percentile(since, 50):.1f} s, "
        f"p95 {percentile(since, 95):.1f} s",
        file=sys.stderr,
    )


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-opbench")
    tmp = Path(tempfile.mkdtemp(prefix="opbench-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    # BENCH_CONTROLLER_QPS: kube-controller-manager's client rate (default: its own 20/s)
    qps = os.environ.get("BENCH_CONTROLLER_QPS")
    tb = Testbed(
        name=name,
        kubeconfig=kubeconfig,
        binaries=Binaries.from_cache(),
        controller_qps=int(qps) if qps else None,
    )
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
        load_before, cpu_before = os.getloadavg()[0], cpu_s(proc.pid)
        requests_before = api_requests(tb) if os.environ.get("BENCH_DEBUG") else {}
        watch = PhaseWatch(tb)
        time.sleep(1)  # the watch is open (it lists nothing yet)
        t0, t0_wall = time.monotonic(), time.time()
        watch.t0 = t0
        tb.kubectl("apply", "-f", "-", input=manifests(), timeout=120)
        peak_rss = rss_mib(proc.pid)
        deadline = t0 + 300
        while len(watch.running) < INSTANCES and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss_mib(proc.pid))
            time.sleep(0.25)
        watch.close()
        running = dict(watch.running)
        if len(running) < INSTANCES:
            print(f"# only {len(running)}/{INSTANCES} instances ran", file=sys.stderr)
            return 1
        elapsed, cpu_used = time.monotonic() - t0, cpu_s(proc.pid) - cpu_before
        if os.environ.get("BENCH_DEBUG"):
            debug_requests(requests_before, api_requests(tb))
            debug_timeline(tb, t0_wall, running)
        # the machine's load says how comparable two runs are
        print(
            f"# load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"operator CPU {cpu_used:.1f} s over {elapsed:.1f} s",
            file=sys.stderr,
        )
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
