"""The gateway's Kubernetes edges against the real test bed: the model manifests are
accepted and scheduled on the right GPUs, the scaler wakes a Deployment, EndpointSlices
name the ready replicas, and deleting the ModelDeployment collects what it owns."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from gpucloud_gateway.billing import ModelPlan, Rule
from gpucloud_gateway.manifests import (
    build_model_deployment,
    build_model_service,
    deployment_name,
)

from gpucloud.testing.kube import get_json, wait_for
from gpucloud.testing.testbed import Testbed as KwokTestbed

pytestmark = pytest.mark.e2e
PRODUCT = "NVIDIA-L40S"


async def catalog_for(namespace: str) -> list[ModelPlan]:
    from gpucloud_gateway.kube import ModelCatalog

    got: asyncio.Queue[list[ModelPlan]] = asyncio.Queue()
    catalog = ModelCatalog(got.put_nowait, asyncio.get_running_loop(), interval=0.2)
    try:
        while True:
            plans = await asyncio.wait_for(got.get(), 30)
            mine = [p for p in plans if p.namespace == namespace]
            if mine:
                return mine
    finally:
        catalog.close()


def test_model_deployment_wakes_and_is_discovered(
    testbed: KwokTestbed, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(testbed.kubeconfig))
    from gpucloud_gateway.kube import EndpointSliceSource, KubeScaler

    testbed.apply(
        [
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "llm", "namespace": namespace},
                "spec": {
                    "model": "llama",
                    "image": "vllm/vllm-openai:v0.6.3",
                    "gpu": {"product": PRODUCT, "count": 2},
                    "visibility": "Private",
                    "minReplicas": 0,
                    "maxReplicas": 2,
                },
            }
        ]
    )
    md = get_json(testbed, "modeldeployment", "llm", "-n", namespace)
    testbed.apply([build_model_deployment(md, replicas=0), build_model_service(md)])
    dep = deployment_name("llm")
    assert get_json(testbed, "deployment", dep, "-n", namespace)["spec"]["replicas"] == 0

    asyncio.run(KubeScaler().wake(namespace, "llm"))
    asyncio.run(KubeScaler().wake(namespace, "llm"))  # a second wake changes nothing

    def running_pod() -> dict | None:
        pods = get_json(testbed, "pods", "-n", namespace)["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return ok[0] if len(pods) == 1 and ok else None

    pod = wait_for(running_pod, timeout=60, what="the woken replica running")
    assert isinstance(pod, dict)
    node = get_json(testbed, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == PRODUCT
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"

    source = EndpointSliceSource(interval=0.2)
    try:
        urls = wait_for(
            lambda: source.endpoints(namespace, "llm"), timeout=60, what="EndpointSlice"
        )
        assert urls == [f"http://{pod['status']['podIP']}:8000"]
        assert source.endpoints(namespace, "other") == []
    finally:
        source.close()

    # The gateway's model list follows the cluster: served once an Account lists the
    # namespace, and billed to that account.
    account = f"acct-{namespace}"[:63]
    testbed.apply(
        [
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "Account",
                "metadata": {"name": account},
                "spec": {"namespaces": [namespace]},
            }
        ]
    )
    try:
        plans = asyncio.run(catalog_for(namespace))
    finally:
        testbed.kubectl("delete", "account", account, "--wait=false", check=False)
    assert [(p.key, p.account, p.rule, p.product, p.gpus_per_replica) for p in plans] == [
        (f"{namespace}/llm", account, Rule.ONLINE, PRODUCT, 2)
    ]

    # The Deployment and Service are owned by the ModelDeployment: collected with it.
    testbed.kubectl("delete", "modeldeployment", "llm", "-n", namespace)

    def gone() -> bool:
        try:
            get_json(testbed, "deployment", dep, "-n", namespace)
        except subprocess.CalledProcessError:
            return True
        return False

    wait_for(gone, timeout=60, what="garbage collection of the Deployment")
