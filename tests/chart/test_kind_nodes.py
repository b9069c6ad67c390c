"""`make kind` emits the test bed's fake GPU nodes: same names, products, labels, GPUs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import yaml

from gpucloud.testing.testbed import REPO, build_node, parse_node_mix

NODES = REPO / "hack" / "kind" / "nodes.py"


def test_kind_nodes_are_the_test_bed_nodes() -> None:
    out = subprocess.run(
        [sys.executable, str(NODES)], text=True, capture_output=True, check=True, timeout=60
    ).stdout
    assert "&id" not in out and "*id" not in out  # no YAML aliases for kubectl to trip on
    docs = list(yaml.safe_load_all(out))
    assert docs == [build_node(n) for n in parse_node_mix()]
    gpu = [d for d in docs if "nvidia.com/gpu" in d["status"]["capacity"]]
    assert {d["metadata"]["labels"]["nvidia.com/gpu.product"] for d in gpu} == {
        "NVIDIA-H100-80GB-HBM3",
        "NVIDIA-A100-SXM4-80GB",
        "NVIDIA-L40S",
        "NVIDIA-GeForce-RTX-4090",
    }
    assert all(d["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake" for d in docs)


def test_kind_nodes_custom_mix() -> None:
    spec = importlib.util.spec_from_file_location("kind_nodes", NODES)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = list(yaml.safe_load_all(module.manifests("NVIDIA-L40S:2:4")))
    assert [d["metadata"]["name"] for d in docs] == ["gpu-l40s-0", "gpu-l40s-1"]
    assert {d["status"]["allocatable"]["nvidia.com/gpu"] for d in docs} == {"4"}


def test_kind_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REPO / "hack" / "kind" / "kind.sh")], check=True)
