"""The agent on a real NVIDIA GPU: NVML read, a workload attributed, usage shipped.

Run on a GPU machine (no Kubernetes there): ``python hack/device/real_nvml_check.py OUTDIR``.
It stands in only for what a GPU node's kubelet and the metering API would provide: a
pod-resources server that assigns the real GPU (by its NVML UUID, as the NVIDIA device
plugin does) to one pod, and an HTTP sink that records what the agent posts to
``/v1/usage``. Everything else is the agent as shipped (``--nvml real``). Writes
``summary.json`` (what was checked and the figures) and exits non-zero if a check fails.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from gpucloud_agent.nvml import NvmlBackend
from gpucloud_agent.podresources.fake_server import FakePod, serve

WORKLOAD = """
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
"""


class Sink(BaseHTTPRequestHandler):
    records: ClassVar[list[dict]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            Sink.records.extend(body["records"])
        data = json.dumps({"accepted": len(body["records"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpucloud_gpu_") or line.startswith("gpucloud_agent_sample"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    checks: dict[str, bool] = {}
    summary: dict[str, object] = {"checks": checks}

    nvml = NvmlBackend()
    dev = nvml.devices()[0]
    summary["device"] = {"uuid": dev.uuid, "product": dev.product, "memory": dev.memory_total_bytes}
    checks["uuid_is_GPU-"] = dev.uuid.startswith("GPU-")
    idle_util = nvml.utilization_percent(0)
    t = time.perf_counter()
    for _ in range(1000):
        nvml.utilization_percent(0)
        nvml.memory_used_bytes(0)
        nvml.processes(0)
    summary["sample_cost_us"] = round((time.perf_counter() - t) * 1000, 1)  # per 1000 -> us
    nvml.close()

    tmp = Path(tempfile.mkdtemp())
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sock = str(tmp / "kubelet.sock")
    pod = FakePod("probe", "gpu-job", "11111111-2222-3333-4444-555555555555", (("main", 1),))
    grpc_server = serve(sock, lambda: [pod], [dev.uuid])
    (tmp / "token").write_text("agent-device-check")

    work = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, "40"], stdout=subprocess.PIPE, text=True
    )
    assert work.stdout is not None
    checks["workload_started"] = work.stdout.readline().strip() == "ready"
    metrics_port = 19400
    log = (out / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpucloud_agent.main", "run", "--node-name", "h100-node",
         "--nvml", "real", "--pod-uid-source", "derived", "--pod-resources-socket", sock,
         "--api-url", f"http://127.0.0.1:{sink.server_address[1]}",
         "--token-file", str(tmp / "token"), "--wal-dir", str(tmp / "wal"),
         "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--disk-root", str(tmp / "data")],
        stderr=log,
    )  # fmt: skip
    started = time.time()
    time.sleep(15)  # the agent samples once a second; let it see the workload for a while
    busy = scrape(metrics_port)
    nv = NvmlBackend()
    procs = nv.processes(0)
    nv.close()
    summary["busy_metrics"] = busy
    summary["nvml_processes"] = [(p.pid, p.used_memory_bytes) for p in procs]
    checks["workload_pid_seen_by_nvml"] = any(p.pid == work.pid for p in procs)
    util = [v for k, v in busy.items() if k.startswith("gpucloud_gpu_utilization_ratio")]
    checks["utilization_busy_gt_0.5"] = bool(util) and max(util) > 0.5
    time.sleep(15)
    final = scrape(metrics_port)
    agent.terminate()
    agent.wait(30)
    held = time.time() - started
    work.kill()
    grpc_server.stop(0)
    sink.shutdown()

    gpu = [r for r in Sink.records if r["kind"] == "gpu_time"]
    seconds = sum(r["quantity"] for r in gpu)
    summary.update(
        idle_utilization_percent=idle_util,
        agent_wall_s=round(held, 1),
        gpu_records=len(gpu),
        gpu_seconds_shipped=seconds,
        first_record=gpu[0] if gpu else None,
    )
    checks["records_for_real_uuid"] = bool(gpu) and all(r["gpu"]["uuid"] == dev.uuid for r in gpu)
    checks["records_for_pod"] = bool(gpu) and all(r["pod"]["name"] == "gpu-job" for r in gpu)
    # the product as GPU feature discovery labels the node: "NVIDIA-H100-80GB-HBM3"
    checks["product_in_label_form"] = bool(gpu) and all(
        r["gpu"]["product"] == dev.product and " " not in dev.product for r in gpu
    )
    allocated = sum(v for k, v in final.items() if k.startswith("gpucloud_gpu_allocated_seconds"))
    summary["allocated_seconds_counter"] = allocated
    # closed 10 s windows are shipped; the open one stays in the WAL cursor for the next
    # start (tests/agent/test_no_lost_seconds.py proves that part), and start-up takes ~2 s
    checks["seconds_close_to_wall"] = held - 16 <= seconds <= allocated <= held + 1
    ordered = sorted(gpu, key=lambda r: r["start"])
    checks["no_overlap"] = all(a["end"] <= b["start"] for a, b in itertools.pairwise(ordered))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
