"""Print, as JSON, what NVML reads on this machine and what one sample costs.

Run on a GPU node: ``python -m gpucloud_agent.nvml_probe [--samples 1000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gpucloud_agent.nvml import NvmlBackend, NvmlError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpucloud_agent.nvml_probe")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        nvml = NvmlBackend()
    except NvmlError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 2
    try:
        devices = nvml.devices()
        report: dict[str, object] = {
            "devices": [
                {
                    "index": d.index,
                    "uuid": d.uuid,
                    "product": d.product,
                    "memory_total_bytes": d.memory_total_bytes,
                    "utilization_percent": nvml.utilization_percent(d.index),
                    "memory_used_bytes": nvml.memory_used_bytes(d.index),
                    "processes": [
                        {"pid": p.pid, "used_memory_bytes": p.used_memory_bytes}
                        for p in nvml.processes(d.index)
                    ],
                }
                for d in devices
            ]
        }
        # one sample = what the agent reads every second for every GPU
        start = time.perf_counter()
        for _ in range(args.samples):
            for d in devices:
                nvml.utilization_percent(d.index)
                nvml.memory_used_bytes(d.index)
                nvml.processes(d.index)
        elapsed = time.perf_counter() - start
        report["samples"] = args.samples
        report["sample_cost_us"] = round(elapsed / max(args.samples, 1) * 1e6, 1)
        print(json.dumps(report, indent=2))
        return 0
    finally:
        nvml.close()


if __name__ == "__main__":
    sys.exit(main())
