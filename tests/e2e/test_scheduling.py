"""The test bed schedules GPU requests for real: product selectors, capacity, Pending."""

from __future__ import annotations

import pytest
import yaml

from gpucloud.testing.kube import get_json, wait_for
from gpucloud.testing.testbed import Testbed

pytestmark = pytest.mark.e2e


def gpu_pod(name: str, product: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": product},
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def create(tb: Testbed, namespace: str, pod: dict) -> None:
    tb.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))


def test_nodes_carry_gpu_capacity_and_gfd_labels(testbed: Testbed) -> None:
    nodes = list(testbed.nodes())
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
    cpu_nodes = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["capacity"]]
    assert len(gpu_nodes) >= 4 and cpu_nodes
    products = {n["metadata"]["labels"]["nvidia.com/gpu.product"] for n in gpu_nodes}
    assert len(products) >= 3
    for n in gpu_nodes:
        labels = n["metadata"]["labels"]
        assert labels["nvidia.com/gpu.count"] == n["status"]["capacity"]["nvidia.com/gpu"]
        assert int(labels["nvidia.com/gpu.memory"]) > 0


def test_gpu_pod_lands_on_a_node_of_its_product_and_runs(testbed: Testbed, namespace: str) -> None:
    product = "NVIDIA-L40S"
    create(testbed, namespace, gpu_pod("l40s-job", product, 2))

    def running() -> dict | None:
        pod = get_json(testbed, "pod", "l40s-job", "-n", namespace)
        return pod if pod["status"].get("phase") == "Running" else None

    pod = wait_for(running, timeout=60, what="the GPU pod to run")
    node = get_json(testbed, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == product
    assert pod["status"].get("podIP")


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(
    testbed: Testbed, namespace: str
) -> None:
    create(testbed, namespace, gpu_pod("too-big", "NVIDIA-A100-SXM4-80GB", 16))

    def unschedulable() -> str | None:
        pod = get_json(testbed, "pod", "too-big", "-n", namespace)
        for cond in pod["status"].get("conditions", []):
            if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return cond["message"]
        return None

    message = wait_for(unschedulable, timeout=60, what="the scheduler's verdict")
    assert "Insufficient nvidia.com/gpu" in message
    pod = get_json(testbed, "pod", "too-big", "-n", namespace)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_gpus_are_not_oversubscribed(testbed: Testbed, namespace: str) -> None:
    # The RTX 4090 node has 4 GPUs: two pods of 2 fit, the third waits.
    for i in range(3):
        create(testbed, namespace, gpu_pod(f"p{i}", "NVIDIA-GeForce-RTX-4090", 2))

    def phases() -> list[str] | None:
        pods = get_json(testbed, "pods", "-n", namespace)["items"]
        got = sorted(p["status"].get("phase", "") for p in pods)
        return got if got.count("Running") == 2 else None

    assert wait_for(phases, timeout=60, what="two pods running") == [
        "Pending",
        "Running",
        "Running",
    ]
