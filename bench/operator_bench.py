"""Operator figures: 200 GPUInstances over 50 fake GPU nodes, apply -> Running.

One ``kubectl apply`` sends the 200 instances, as a tenant would. Prints
``instances_running_p95_s: N`` (goal < 5 s): the 95th percentile over the instances of
the time from an instance's creation to its ``Running`` phase, both seen by one
``kubectl get -w``; the median of the same; ``instances_apply_s`` (how long the apply
took to create them all: kubectl sends one object after another) and
``instances_all_running_s`` (from the start of the apply until the last one ran); and
``operator_rss_mib`` (goal < 250). Runs its own test bed cluster
(GPUCLOUD_TESTBED_NAME, default ``gpucloud-opbench``) so the shared default cluster is
left alone, and deletes it afterwards. BENCH_DEBUG=1 adds, on stderr, the CPU of every
process, the API requests of the burst and a timeline with the slowest instances;
BENCH_PROFILE=<file> records the operator with py-spy (collapsed stacks; py-spy is
a dev dependency).
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
from typing import Any

import yaml
from gpucloud_operator.builders import STORAGE_CLASS

from gpucloud.clock import FileClock
from gpucloud.ledger import EntryKind, open_ledger
from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Binaries, Testbed, parse_node_mix

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "200"))
# 32 GPUs a node: the 200 instances (300 GPUs) and the two sets of 200 bare pods beside
# them (300 GPUs each) all fit, with room to spare
NODES = os.environ.get("GPUCLOUD_TESTBED_NODES", "NVIDIA-L40S:25:32,NVIDIA-A100-SXM4-80GB:25:32")
NS = "opbench"
QUOTA_GI = 20
Obj = dict[str, Any]


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


def shape(i: int) -> tuple[str, int]:
    """Instance ``i``'s GPU product and count (the bare pods copy them)."""
    return ("NVIDIA-L40S" if i % 2 else "NVIDIA-A100-SXM4-80GB"), 1 + i % 2


def manifests() -> str:
    docs = []
    for i in range(INSTANCES):
        product, count = shape(i)
        docs.append(
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "GPUInstance",
                "metadata": {"name": f"i{i:03d}", "namespace": NS},
                "spec": {
                    "gpu": {"product": product, "count": count},
                    "billing": {"mode": "PayAsYouGo"},
                    "storage": {"quotaGi": QUOTA_GI},
                },
            }
        )
    return yaml.safe_dump_all(docs)


def bare_manifests(group: str) -> tuple[list[Obj], list[Obj]]:
    """Pods like the instances' own, without the operator: the same GPU requests and
    product selector, each with a claim pre-bound to a hostPath volume of the quota
    (the operator's storage class, no provisioner). Returns the volumes and claims, and
    the pods; ``group`` prefixes the names and is their ``bench`` label."""
    claims: list[Obj] = []
    pods: list[Obj] = []
    for i in range(INSTANCES):
        product, count = shape(i)
        name = f"{group}-{i:03d}"
        claims.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"{NS}-{name}", "labels": {"bench": group}},
                "spec": {
                    "capacity": {"storage": f"{QUOTA_GI}Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": STORAGE_CLASS,
                    "volumeMode": "Filesystem",
                    "hostPath": {"path": f"/var/lib/opbench/{name}", "type": "DirectoryOrCreate"},
                    "claimRef": {"namespace": NS, "name": name},
                },
            }
        )
        claims.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": NS, "labels": {"bench": group}},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": STORAGE_CLASS,
                    "volumeName": f"{NS}-{name}",
                    "resources": {"requests": {"storage": f"{QUOTA_GI}Gi"}},
                },
            }
        )
        container = {
            "name": "main",
            "image": "busybox",
            "command": ["sleep", "infinity"],
            "resources": {"limits": {"nvidia.com/gpu": str(count)}},
            "volumeMounts": [{"name": "data", "mountPath": "/root/data"}],
        }
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": {"bench": group}},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.product": product},
                    "containers": [container],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
                },
            }
        )
    return claims, pods


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


def process_cpu() -> dict[str, float]:
    """CPU seconds used so far by every process of this machine, by command name."""
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
        except OSError:
            continue
        comm = head.partition("(")[2]
        fields = rest.split()
        ticks = int(fields[11]) + int(fields[12])
        out[comm] = out.get(comm, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
    return out


def debug_cpu(before: dict[str, float], after: dict[str, float]) -> None:
    """Who used the CPU during the burst (processes that ended are missed)."""
    delta = sorted(((v - before.get(k, 0.0), k) for k, v in after.items()), reverse=True)
    print(
        "# CPU during the burst: " + ", ".join(f"{k} {v:.1f} s" for v, k in delta[:8] if v >= 0.5),
        file=sys.stderr,
    )


def debug_requests(before: dict[str, float], after: dict[str, float]) -> None:
    """API requests during the burst (all clients; watches count once), busiest first."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    top = sorted(((v, k) for k, v in delta.items() if v >= INSTANCES / 4), reverse=True)
    total = sum(v for v in delta.values() if v > 0)
    print(f"# API requests during the burst: {total:.0f} in all", file=sys.stderr)
    for v, k in top:
        print(f"#   {v:6.0f} {k}", file=sys.stderr)


class PhaseWatch:
    """When each object was first seen and first seen Running, from one ``kubectl get
    -w`` (``namespace`` None: all namespaces; names are then ``ns/name``): polling with
    a kubectl per look would spend much of a small machine's CPU on measuring."""

    def __init__(
        self,
        tb: Testbed,
        resource: str = "gpuinstances",
        namespace: str | None = NS,
        selector: str | None = None,
    ) -> None:
        cmd = [str(tb.bin.kubectl), "--kubeconfig", str(tb.kubeconfig), "get", resource]
        cmd += ["-n", namespace] if namespace else ["-A"]
        cmd += ["-l", selector] if selector else []
        cmd += [
            "-w",
            "--no-headers",
            "-o",
            "custom-columns=S:.metadata.namespace,N:.metadata.name,P:.status.phase",
        ]
        self.all_namespaces = namespace is None
        self._cmd, self._env, self._closed = cmd, tb.env(), False
        self.proc = self._open()
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}  # first sight: the object was created
        self.running: dict[str, float] = {}
        self.phases: dict[str, str] = {}  # the last phase seen
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _open(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self._cmd, env=self._env, stdout=subprocess.PIPE, text=True)

    def _read(self) -> None:
        while True:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                ns, name, phase = [*line.split(), "", "", ""][:3]
                key = f"{ns}/{name}" if self.all_namespaces else name
                now = time.monotonic() - self.t0
                self.seen.setdefault(key, now)
                self.phases[key] = phase
                if phase == "Running":
                    self.running.setdefault(key, now)
            if self._closed:
                return
            # the API server ended the watch (a busy one does): watch again; the new
            # listing shows what changed meanwhile, a little later than it happened
            print("# the watch ended; watching again", file=sys.stderr)
            self.proc.wait()
            self.proc = self._open()

    def count(self, phase: str) -> int:
        return sum(1 for p in list(self.phases.values()) if p == phase)

    def close(self) -> None:
        self._closed = True
        self.proc.terminate()
        self.proc.wait(timeout=10)


def debug_timeline(
    tb: Testbed, t0_wall: float, seen: dict[str, float], running: dict[str, float]
) -> None:
    """When each step happened, relative to the apply (stderr; BENCH_DEBUG=1): the
    percentiles of each step, then the slowest instances step by step. Kubernetes
    stamps have 1 s resolution; seen/running come from the bench's own watch."""

    def stamp(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() - t0_wall

    def by_instance(kind: str, managed: bool = False) -> list[Obj]:
        args = ["get", kind, "-n", NS, "-o", "json"] + (
            ["--show-managed-fields"] if managed else []
        )
        return json.loads(tb.kubectl(*args).stdout)["items"]

    def owner(o: Obj) -> str:
        return (o["metadata"].get("labels") or {}).get("gpucloud.dev/instance", "")

    steps: dict[str, dict[str, float]] = {
        "claim created": {},
        "claim bound": {},
        "pod created": {},
        "pod started": {},
    }
    for c in by_instance("pvc", managed=True):
        steps["claim created"][owner(c)] = stamp(c["metadata"]["creationTimestamp"])
        for f in c["metadata"].get("managedFields") or []:
            # when the PV controller wrote the claim's Bound status
            if f.get("manager") == "kube-controller-manager" and f.get("subresource") == "status":
                steps["claim bound"][owner(c)] = stamp(f["time"])
    for pod in by_instance("pods"):
        steps["pod created"][owner(pod)] = stamp(pod["metadata"]["creationTimestamp"])
        if pod["status"].get("startTime"):
            steps["pod started"][owner(pod)] = stamp(pod["status"]["startTime"])
    for label, values in (
        ("instance created", seen),
        *steps.items(),
        ("instance Running", running),
    ):
        if values:
            v = list(values.values())
            print(
                f"# {label}: p50 {percentile(v, 50):.1f} s, p95 {percentile(v, 95):.1f} s",
                file=sys.stderr,
            )
    slow = sorted(running, key=lambda n: running[n] - seen.get(n, 0.0), reverse=True)[:12]
    print("# slowest: name seen claim bound pod started running", file=sys.stderr)
    for n in slow:
        cols = [seen.get(n), *(steps[k].get(n) for k in steps), running[n]]
        print(
            "#   " + n + " " + " ".join("-" if c is None else f"{c:.1f}" for c in cols),
            file=sys.stderr,
        )


def start_operator(tmp: Path, kubeconfig: Path, clock: FileClock, url: str, **env: str) -> Any:
    """The operator as its own process on the bench's clock and ledger; ``env`` adds
    its settings (``GPUCLOUD_OPERATOR_*``). Its log goes to ``tmp/operator.log``."""
    env = dict(os.environ) | {
        "KUBECONFIG": str(kubeconfig),
        "GPUCLOUD_LEDGER_URL": url,
        "GPUCLOUD_CLOCK": f"file:{clock.path}",
        **env,
    }
    log = (tmp / "operator.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "gpucloud_operator.main", "--standalone", "-A"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_profiler(pid: int) -> Any:
    """py-spy recording ``pid`` into BENCH_PROFILE (collapsed stacks), if it is set;
    stop it with ``stop_profiler``."""
    if not os.environ.get("BENCH_PROFILE"):
        return None
    py_spy = str(Path(sys.executable).parent / "py-spy")
    args = ["record", "--format", "raw", "--gil", "--nonblocking", "-r", "100"]
    args += ["-o", os.environ["BENCH_PROFILE"], "--pid", str(pid)]
    return subprocess.Popen([py_spy, *args], stdout=subprocess.DEVNULL)


def stop_profiler(profiler: Any) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)


def wait_running(watch: PhaseWatch, count: int, pid: int, timeout: float) -> float:
    """Wait until ``count`` objects of the watch are Running; the operator's peak RSS."""
    peak_rss = rss_mib(pid)
    deadline = time.monotonic() + timeout
    while len(watch.running) < count and time.monotonic() < deadline:
        peak_rss = max(peak_rss, rss_mib(pid))
        time.sleep(0.25)
    return peak_rss


def latencies(watch: PhaseWatch) -> list[float]:
    """Each object's time from its creation (first sight) to Running."""
    return [t - watch.seen.get(n, 0.0) for n, t in dict(watch.running).items()]


def bare_pods(tb: Testbed, group: str, bound_first: bool) -> list[float] | None:
    """200 bare pods beside the running instances; each one's creation -> Running (None:
    not all ran). ``bound_first`` False: volume, claim and pod of each in one apply, as
    the instances were sent. True: the volumes and claims applied and bound first, then
    the pods in one apply (the pods never wait for a bind)."""
    claims, pods = bare_manifests(group)
    if bound_first:
        tb.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(claims), timeout=300)
        tb.kubectl(
            *("wait", "pvc", "-n", NS, "-l", f"bench={group}", "--timeout=300s"),
            "--for=jsonpath={.status.phase}=Bound",
            timeout=310,
        )
        docs = pods
    else:  # volume, claim, pod; one after another
        docs = [d for i in range(INSTANCES) for d in (claims[2 * i], claims[2 * i + 1], pods[i])]
    watch = PhaseWatch(tb, "pods", NS, selector=f"bench={group}")
    time.sleep(1)  # the watch is open
    watch.t0 = time.monotonic()
    try:
        tb.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), timeout=300)
        deadline = time.monotonic() + 300
        while len(watch.running) < INSTANCES and time.monotonic() < deadline:
            time.sleep(0.25)
    finally:
        watch.close()
    if len(watch.running) < INSTANCES:
        print(f"# only {len(watch.running)}/{INSTANCES} {group} pods ran", file=sys.stderr)
        return None
    return latencies(watch)


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-opbench")
    tmp = Path(tempfile.mkdtemp(prefix="opbench-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    # kube-controller-manager's client rate. Its PV controller makes 3 writes per claim
    # it binds, so Kubernetes' default of 20 requests/s binds at most ~6.7 claims/s,
    # fewer than one kubectl applies; clusters of this size raise it, and so does the
    # bench (BENCH_CONTROLLER_QPS=20 measures the default; docs/benchmarks.md).
    qps = int(os.environ.get("BENCH_CONTROLLER_QPS") or "100")
    print(f"# kube-controller-manager client rate: {qps}/s", file=sys.stderr)
    tb = Testbed(
        name=name,
        kubeconfig=kubeconfig,
        binaries=Binaries.from_cache(),
        controller_qps=qps,
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
        proc = start_operator(tmp, kubeconfig, clock, url, GPUCLOUD_OPERATOR_NAMESPACES=NS)
        time.sleep(3)  # let the operator list and watch before the burst
        load_before, cpu_before = os.getloadavg()[0], cpu_s(proc.pid)
        requests_before = api_requests(tb) if os.environ.get("BENCH_DEBUG") else {}
        cpu_all_before = process_cpu()
        watch = PhaseWatch(tb)
        profiler = start_profiler(proc.pid)
        time.sleep(1)  # the watch is open (it lists nothing yet)
        t0, t0_wall = time.monotonic(), time.time()
        watch.t0 = t0
        # BENCH_APPLY_ARGS: e.g. --server-side (one request per object: a faster burst)
        extra = os.environ.get("BENCH_APPLY_ARGS", "").split()
        tb.kubectl("apply", *extra, "-f", "-", input=manifests(), timeout=120)
        peak_rss = wait_running(watch, INSTANCES, proc.pid, timeout=300 - (time.monotonic() - t0))
        watch.close()
        stop_profiler(profiler)
        running = dict(watch.running)
        if len(running) < INSTANCES:
            print(f"# only {len(running)}/{INSTANCES} instances ran", file=sys.stderr)
            return 1
        elapsed, cpu_used = time.monotonic() - t0, cpu_s(proc.pid) - cpu_before
        if os.environ.get("BENCH_DEBUG"):
            debug_cpu(cpu_all_before, process_cpu())
            for what in ("nodes", "pods"):  # what every list of them costs to decode
                size = len(tb.kubectl("get", "--raw", f"/api/v1/{what}").stdout)
                print(f"# one list of all {what}: {size / 1024:.0f} KiB of JSON", file=sys.stderr)
            debug_requests(requests_before, api_requests(tb))
            debug_timeline(tb, t0_wall, dict(watch.seen), running)
        # the machine's load says how comparable two runs are
        print(
            f"# load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"operator CPU {cpu_used:.1f} s over {elapsed:.1f} s",
            file=sys.stderr,
        )
        latency = latencies(watch)
        print(f"instances_running_p95_s: {percentile(latency, 95):.1f}")
        print(f"instances_running_p50_s: {percentile(latency, 50):.1f}")
        print(f"instances_apply_s: {max(watch.seen.values()):.1f}")
        print(f"instances_all_running_s: {max(running.values()):.1f}")
        print(f"operator_rss_mib: {peak_rss:.0f}", flush=True)
        # the same GPU requests and claims without the operator, on the same cluster now
        bare = bare_pods(tb, "bare", bound_first=False)
        if bare is None:
            return 1
        bound = bare_pods(tb, "bound", bound_first=True)
        if bound is None:
            return 1
        print(f"bare_pods_running_p95_s: {percentile(bare, 95):.1f}")
        print(f"bare_pods_running_p50_s: {percentile(bare, 50):.1f}")
        ratio = percentile(latency, 95) / max(percentile(bare, 95), 0.1)
        print(f"operator_start_overhead_ratio: {ratio:.2f}")
        print(f"bound_claim_pods_running_p95_s: {percentile(bound, 95):.1f}")
        strict = percentile(latency, 95) / max(percentile(bound, 95), 0.1)
        print(f"operator_start_overhead_ratio_bound_claims: {strict:.2f}")
        return 0
    finally:
        if proc is not None:
            stop_process(proc)
        tb.down()


if __name__ == "__main__":
    sys.exit(main())
