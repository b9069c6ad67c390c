"""Cost of the node agent: 8 fake GPUs, 16 pods churning, sampled at 1 Hz.

Runs the agent as a real process (fake NVML, a fake pod-resources server over a unix
socket, a local usage receiver) and prints its CPU (% of one core, from /proc/<pid>/stat),
RSS and the p99 lateness of its sampling ticks (from the agent's /debug/state).

    .venv/bin/python bench/agent_bench.py [--duration 120]

Goals: agent_cpu_percent <= 0.25, agent_rss_mib <= 40 (issue 20), agent_sample_drift_p99_ms <= 50.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from gpucloud_agent.podresources.fake_server import FakePod, fake_device_ids, serve

from gpucloud.testing.net import free_port

NODE = "bench-node"
GPUS = 8
PODS = 16


def start_receiver() -> tuple[ThreadingHTTPServer, list[int]]:
    received = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received[0] += len(body["records"])
            out = json.dumps({"accepted": len(body["records"]), "duplicate": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    (tmp / "nvml.json").write_text(
        json.dumps(
            {
                "node": NODE,
                "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-A100",
                    "nvidia.com/gpu.memory": "81920",
                },
                "capacity": {"nvidia.com/gpu": GPUS},
            }
        )
    )
    all_pods = [FakePod("bench", f"job-{i}", f"uid-{i}", (("main", 1),)) for i in range(PODS)]
    started = time.monotonic()

    def pods() -> list[FakePod]:
        # 16 pods on 8 GPUs: every 15 s the other half of the pods holds the GPUs
        half = int((time.monotonic() - started) // 15) % 2
        return all_pods[half * GPUS : (half + 1) * GPUS]

    sock = str(tmp / "kubelet.sock")
    grpc_server = serve(sock, pods, fake_device_ids(NODE, GPUS))
    receiver, received = start_receiver()
    port = free_port()
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "gpucloud_agent.main",
            "--node-name", NODE, "--nvml", "fake", "--fake-config", str(tmp / "nvml.json"),
            "--pod-uid-source", "derived", "--pod-resources-socket", sock,
            "--api-url", f"http://127.0.0.1:{receiver.server_port}",
            "--token-file", str(tmp / "none"), "--wal-dir", str(tmp / "wal"),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(port),
            "--sample-period", "1", "--log-level", "WARNING",
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError("agent did not become ready")
            time.sleep(0.1)
        time.sleep(args.warmup)  # let imports and first allocations settle
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(args.duration)
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        state = httpx.get(f"http://127.0.0.1:{port}/debug/state").json()
        print(f"agent_cpu_percent: {100 * (cpu1 - cpu0) / (t1 - t0):.2f}")
        print(f"agent_rss_mib: {rss_mib(agent.pid):.1f}")
        print(f"agent_sample_drift_p99_ms: {1000 * (state['tick_lateness_p99_s'] or 0):.2f}")
        print(f"samples: {state['samples_total']}  records_received: {received[0]}")
        return 0
    finally:
        agent.terminate()
        agent.wait(10)
        receiver.shutdown()
        grpc_server.stop(None)


if __name__ == "__main__":
    sys.exit(main())
