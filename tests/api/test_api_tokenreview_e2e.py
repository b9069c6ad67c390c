"""TokenReview against the real API server of the kwok test bed (marked e2e).

Pod-bound ServiceAccount tokens carry the pod's node (the TokenReview's
``status.user.extra["authentication.kubernetes.io/node-name"]``); an unbound token of
another SA gets its node from the configured SA->node mapping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import yaml
from apihelpers import auth, gpu_record

from gpucloud.api.testserver import ApiProcess
from gpucloud.testing import (
    testbed as testbed_mod,
)  # (not "import Testbed": pytest would collect it)

pytestmark = pytest.mark.e2e
NS = "gpucloud-system"
AGENT = "gpucloud-agent"


def kubectl(tb: testbed_mod.Testbed, *args: str, input: str | None = None) -> str:
    return tb.kubectl(*args, input=input).stdout.strip()


@pytest.fixture(scope="module")
def agent_pod(testbed: testbed_mod.Testbed) -> Iterator[tuple[str, str]]:
    """(pod name, node name): an agent pod placed on the first kwok node."""
    node = next(testbed.nodes())["metadata"]["name"]
    pod = f"agent-{uuid.uuid4().hex[:6]}"
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": AGENT, "namespace": NS},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "unbound", "namespace": NS},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": NS},
            "spec": {
                "serviceAccountName": AGENT,
                "nodeName": node,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "agent", "image": "gpucloud-agent:e2e"}],
            },
        },
    ]
    testbed.apply(yaml.safe_dump_all(docs))
    yield pod, node
    testbed.kubectl("delete", "pod", pod, "-n", NS, "--wait=false", check=False)


def test_tokenreview_against_the_test_bed(
    testbed: testbed_mod.Testbed,
    agent_pod: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pod, node = agent_pod
    bound = kubectl(
        testbed, "create", "token", AGENT, "-n", NS,
        "--bound-object-kind", "Pod", "--bound-object-name", pod,
    )  # fmt: skip
    unbound = kubectl(testbed, "create", "token", "unbound", "-n", NS)
    unbound_user = f"system:serviceaccount:{NS}:unbound"
    api = ApiProcess(
        tmp_path_factory.mktemp("tr-e2e"),
        static_tokens=False,
        extra_args=[
            "--kubeconfig", str(testbed.kubeconfig),
            "--sa-node-map", f"{unbound_user}=gpu-other",
        ],
    )  # fmt: skip
    with api, httpx.Client(base_url=api.url, timeout=30) as c:
        post = lambda token, n: c.post(  # noqa: E731
            "/v1/usage", json={"records": [gpu_record(node=n)]}, headers=auth(token)
        )
        assert post(bound, node).status_code == 200  # the node claim of the pod-bound token
        # a record of another node: refused on its own (422, nothing else in the batch)
        other = post(bound, "some-other-node")
        assert other.status_code == 422 and other.json()["errors"][0]["rule"] == "wrong_node"
        assert post(unbound, "gpu-other").status_code == 200  # via the SA->node mapping
        assert post(unbound, node).status_code == 422
        assert post("not-a-token", node).status_code == 401
