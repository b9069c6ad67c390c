"""The gateway's Kubernetes edges against the real test bed: the model manifests are
accepted and scheduled on the right GPUs, the scaler wakes a Deployment, EndpointSlices
name the ready replicas, and deleting the ModelDeployment collects what it owns."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from gateway_testkit import PRICEBOOK_SPEC, start_gateway, start_model_server, write_endpoints
from gateway_testkit import wait_for as await_cond

from gpucloud.billing.model_charges import ModelPlan, Rule
from gpucloud.ledger import EntryKind, open_ledger
from gpucloud.model_manifests import (
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
    catalog = ModelCatalog(
        lambda plans, _directory: got.put_nowait(plans), asyncio.get_running_loop(), interval=0.2
    )
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


def test_callers_authenticate_with_service_account_tokens(
    testbed: KwokTestbed, namespace: str, tmp_path: Path
) -> None:
    """TokenReview against the real API server: a ServiceAccount token of a namespace
    the caller's account lists pays for the call; a made-up token gets 401."""
    testbed.kubectl("create", "serviceaccount", "caller", "-n", namespace)
    token = testbed.kubectl("create", "token", "caller", "-n", namespace).stdout.strip()
    server, server_url = start_model_server(tmp_path, "pub")
    write_endpoints(tmp_path / "endpoints.json", {"owner-ns/pub": [server_url]})
    (tmp_path / "pricebook.yaml").write_text(
        yaml.safe_dump({"kind": "PriceBook", "spec": PRICEBOOK_SPEC})
    )
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for acct in ("owner", "caller"):
        ledger.ensure_account(acct)
        ledger.post_entry(acct, EntryKind.RECHARGE, 10_000, f"seed:{acct}", at=datetime.now(UTC))
    model = {
        "namespace": "owner-ns",
        "name": "pub",
        "account": "owner",
        "visibility": "Public",
        "publisher": "Official",
        "task": "TextGeneration",
    }
    gateway, url = start_gateway(
        tmp_path,
        {
            "models": [model],
            "endpoints": {"kind": "file", "path": "endpoints.json"},
            "auth": {"kind": "tokenreview", "cacheSeconds": 5},
            "accounts": {"caller": [namespace]},
            "billing": {
                "queue": "usage-queue.db",
                "pricebook": "pricebook.yaml",
                "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
            },
        },
        env={"KUBECONFIG": str(testbed.kubeconfig)},
    )
    try:
        body = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 997}
        path = url + "/owner-ns/pub/v1/chat/completions"
        for _ in range(3):  # the first is reviewed, the others hit the cache
            r = httpx.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        r = httpx.post(path, json=body, headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401 and "invalid or expired" in r.json()["error"]["message"]
        # 3 x 1000 tokens at 0.0137 per 1K: 4.11 fen, rounded once.
        charges = lambda: ledger.charges_by_resource("caller").get("model/owner-ns/pub", 0)  # noqa: E731
        await_cond(lambda: charges() == 4, what="the caller's charge")
        assert ledger.charges_by_resource("owner").get("model/owner-ns/pub", 0) == 0
    finally:
        gateway.stop()
        server.stop()
        ledger.close()


def test_ready_only_once_the_cluster_was_listed(testbed: KwokTestbed, tmp_path: Path) -> None:
    """Liveness and readiness differ: a gateway whose API server does not answer is alive
    (restarting would not help) but not ready, naming what it waits for; pointed at the
    test bed it becomes ready. Real processes, a real and a dead API server."""
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dead",
                "clusters": [{"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
            }
        )
    )
    config = {"models": {"kind": "kubernetes"}, "endpoints": {"kind": "kubernetes"}}
    for kubeconfig, ready in ((dead, False), (testbed.kubeconfig, True)):
        gateway, url = start_gateway(
            tmp_path, config, name=f"gw-{ready}", env={"KUBECONFIG": str(kubeconfig)}
        )
        try:
            if ready:
                readyz = url + "/readyz"
                await_cond(lambda u=readyz: httpx.get(u).status_code == 200, what="ready")
                assert httpx.get(gateway.ops_url + "/readyz").json()["waiting"] == []
            else:
                r = httpx.get(url + "/readyz")
                assert r.status_code == 503, r.text
                assert set(r.json()["waiting"]) == {
                    "EndpointSlices not listed yet",
                    "ModelDeployments not listed yet",
                }
                assert httpx.get(url + "/healthz").status_code == 200
        finally:
            gateway.stop()
