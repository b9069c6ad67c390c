"""A private ModelDeployment run by the operator process on the test bed: woken by a
request, scaled up under load, stepped down per quiet window, sent cold after the idle
time, and billed exactly its replicas' online time x the GPU-hour price, to the fen. And
one on a MIG slice: its replicas ask for the slice and run on a node split 7 x 1g.10gb.

The gateway's ``/v1/stats`` is a JSON file the test writes (``model_stats_url=file:``);
time rules run on the file clock; the Deployment controller, scheduler and fake kubelets
are real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from opharness import T0, Harness, fake_node

from gpucloud.billing import to_minor
from gpucloud.kube_names import PRODUCT_LABEL
from gpucloud.model_manifests import build_model_deployment, deployment_name
from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import NodeSpec, Testbed

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-80GB"
PER_HOUR = Decimal("9.80")  # the example PriceBook's modelOnlinePerHour for the A100
H100 = "NVIDIA-H100-80GB-HBM3"
MIG = f"{H100}-MIG-1g.10gb"  # 2.83/h per slice, nvidia.com/mig-1g.10gb (mixed strategy)


@pytest.fixture
def h(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(
        testbed,
        namespace,
        tmp_path,
        model_interval_s="0.5",
        model_stats_url=f"file:{tmp_path / 'stats.json'}",
    )
    harness.setup()
    yield harness
    harness.close()


class Model:
    def __init__(self, h: Harness) -> None:
        self.h, self.key = h, f"{h.ns}/llm"
        self.stats_path = h.tmp / "stats.json"

    def traffic(self, requests: int, queued: int = 0, last: Any = None) -> None:
        entry = {
            "requestsLastWindow": requests,
            "lastRequestAt": (last or self.h.clock.now()).isoformat(),
            "inFlight": 0,
            "queued": queued,
            "replicas": {},
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({self.key: entry}))
        tmp.replace(self.stats_path)

    def status(self) -> dict[str, Any]:
        return get_json(self.h.tb, "modeldeployment", "llm", "-n", self.h.ns).get("status") or {}

    def replicas(self) -> int:
        dep = get_json(self.h.tb, "deployment", deployment_name("llm"), "-n", self.h.ns)
        return int(dep["spec"].get("replicas", 0))

    def pods(self) -> list[dict[str, Any]]:
        return get_json(self.h.tb, "pods", "-n", self.h.ns)["items"]

    def closed_intervals(self) -> int:
        """Replica intervals the operator has closed in the ledger."""
        return sum(1 for iv in self.h.ledger.replica_intervals(self.key) if iv.end is not None)

    def settled(self, replicas: int, ready: int, closed: int) -> bool:
        st = self.status()
        return (
            st.get("replicas") == replicas
            and st.get("readyReplicas") == ready
            and len(self.pods()) == ready
            and self.closed_intervals() == closed
        )


def model_deployment(h: Harness, product: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": h.ns},
        "spec": {
            "model": "llama",
            "image": "vllm/vllm-openai:v0.6.3",
            "gpu": {"product": product, "count": 1},
            "visibility": "Private",
            "minReplicas": 0,
            "maxReplicas": 3,
            "scaling": {
                "targetRequestsPerReplica": 10,
                "windowSeconds": 600,
                "coldAfterSeconds": 1800,
            },
            **spec,
        },
    }


def test_private_model_wakes_scales_goes_cold_billed_to_the_fen(h: Harness) -> None:
    m = Model(h)
    h.start()
    md = model_deployment(h, A100)
    h.tb.kubectl("apply", "-f", "-", input=yaml.safe_dump(md))
    h.wait(lambda: m.status().get("state") == "Cold", "the model to be created cold")
    assert m.replicas() == 0 and m.pods() == []

    # A request queued at the cold model: one replica, on an A100 node.
    m.traffic(1, queued=1)
    h.wait(lambda: m.settled(1, 1, 0), "the woken replica", timeout=60)
    [pod] = m.pods()
    node = get_json(h.tb, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"][PRODUCT_LABEL] == A100
    assert m.status()["state"] == "Serving"
    m.traffic(1, last=T0)

    # Load: 25 requests in the window at 10 per replica -> max (3) at once.
    h.advance(100)
    m.traffic(25)
    h.wait(lambda: m.settled(3, 3, 0), "scale-up to 3", timeout=60)
    assert "ScaledUp" in h.events("llm")

    # Quiet windows: one replica fewer per window, then cold after 1800 s idle.
    last = T0 + timedelta(seconds=100)
    m.traffic(0, last=last)
    h.advance(600)  # t=700
    h.wait(lambda: m.settled(2, 2, 1), "the first step down", timeout=120)
    h.advance(600)  # t=1300
    h.wait(lambda: m.settled(1, 1, 2), "the second step down", timeout=120)
    h.advance(600)  # t=1900: idle for 1800 s since the last request
    h.wait(lambda: m.settled(0, 0, 3), "the model to go cold", timeout=60)
    st = m.status()
    assert st["state"] == "Cold" and m.replicas() == 0

    # Online: t=0..1900, 100..1300, 100..700 (which replica went first does not change
    # the sum) = 3700 replica-seconds x 1 GPU x 9.80/h.
    expected = to_minor(PER_HOUR * 3700 / 3600)
    assert expected == 1007
    h.wait(lambda: m.status().get("cost") == "10.07", "the cost in status", timeout=30)
    online = h.ledger.charges_by_resource(h.account).get(f"model/{h.ns}/llm#online", 0)
    assert online == expected and h.charges() == expected
    reasons = h.events("llm")
    assert {"Woke", "ScaledUp", "WentCold"} <= set(reasons) and reasons.count("ScaledDown") == 2

    # Cold costs nothing; deleting the model lets it go and collects its Deployment.
    h.advance(3600)
    h.tb.kubectl("delete", "modeldeployment", "llm", "-n", h.ns, "--wait=false")
    h.wait(
        lambda: (
            h.tb.kubectl("get", "modeldeployment", "llm", "-n", h.ns, check=False).returncode != 0
        ),
        "the ModelDeployment to be deleted",
    )
    assert h.charges() == expected


def test_a_model_on_a_mig_slice_runs_on_the_split_node(h: Harness, namespace: str) -> None:
    m = Model(h)
    spec = NodeSpec(f"gpu-h100-mig-{namespace[-5:]}", H100, 0, mig=("1g.10gb",) * 7)
    with fake_node(h.tb, spec) as node:
        md = model_deployment(h, MIG, minReplicas=2, maxReplicas=2)
        h.tb.kubectl("apply", "-f", "-", input=yaml.safe_dump(md))
        # its Deployment as an operator before fractional GPUs made it: a whole GPU each,
        # on nodes labelled with the slice's name (none is); the operator must replace
        # the resources, not merge the slice in beside nvidia.com/gpu
        md = get_json(h.tb, "modeldeployment", "llm", "-n", h.ns)
        h.tb.apply([build_model_deployment(md, replicas=0)])
        h.start()
        h.wait(lambda: m.settled(2, 2, 0), "two replicas Running on the split node", timeout=60)
        for pod in m.pods():
            assert pod["spec"]["nodeName"] == node and pod["status"]["phase"] == "Running"
            assert pod["spec"]["nodeSelector"] == {PRODUCT_LABEL: H100}
            assert pod["spec"]["containers"][0]["resources"] == {
                "limits": {"nvidia.com/mig-1g.10gb": "1"},
                "requests": {"nvidia.com/mig-1g.10gb": "1"},
            }
        # 2 replicas x 1000 s x 2.83/h per slice = 1.572 -> 1.57
        h.advance(1000)
        h.wait(lambda: m.status().get("cost") == "1.57", "the slices' online cost", timeout=30)
        assert h.charges() == to_minor(Decimal("2.83") * 2 * 1000 / 3600) == 157
        h.tb.kubectl("delete", "modeldeployment", "llm", "-n", h.ns, "--wait=false")
