"""The agent against the real NVML, on machines that have an NVIDIA GPU and PyTorch.

Skipped elsewhere (CI has no GPU); `hack/device/real_nvml_check.py` is what it runs, and
docs/agent.md records a run on an H100.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpucloud.testing.testbed import REPO


def _gpu_and_torch() -> bool:
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return bool(torch.cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(not _gpu_and_torch(), reason="needs an NVIDIA GPU, its driver and PyTorch")
def test_agent_on_a_real_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "device" / "real_nvml_check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(summary["checks"].values()), (summary["checks"], proc.stderr[-2000:])
