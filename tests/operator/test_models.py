"""The ModelDeployment reconciler on the in-memory API double (with a small Deployment
controller and scheduler) and a real SQLite ledger: wake, scale up, step down, cold,
billing of online time to the fen, and the pure pieces around ``decide``."""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.models import (
    DELETION_COST,
    VICTIM_COST,
    CallableStats,
    FileStats,
    HttpStats,
    ModelReconciler,
    NoStats,
    StatsError,
    parse_stats,
    pod_view,
    stats_source,
)
from gpucloud_operator.placement import NodeGPUs
from opfake import FakeKube
from opworld import NS, ROOT, T0

from gpucloud.billing import to_minor
from gpucloud.clock import ManualClock
from gpucloud.kube_names import GPU_RESOURCE, PRODUCT_LABEL
from gpucloud.ledger import open_ledger
from gpucloud.model_manifests import MODEL_LABEL, build_model_deployment, deployment_name

Obj = dict[str, Any]
L40S = "NVIDIA-L40S"


class ModelKube(FakeKube):
    """FakeKube plus Deployments, Services and a Deployment controller that creates and
    removes pods (lowest pod-deletion-cost first) and schedules them as the scheduler
    would: onto a node with the product label the pod selects and room in the resource
    it requests (``fractional``: nodes selling a resource other than nvidia.com/gpu, each
    with its product label)."""

    def __init__(self, nodes: list[NodeGPUs]) -> None:
        super().__init__(nodes)
        self.fractional: dict[str, list[NodeGPUs]] = {}
        self.deployments: dict[tuple[str, str], Obj] = {}
        self.services: dict[tuple[str, str], Obj] = {}
        self.scales: list[int] = []
        self.ips = 0

    def get_deployment(self, namespace: str, name: str) -> Obj | None:
        dep = self.deployments.get((namespace, name))
        return copy.deepcopy(dep) if dep else None

    def apply_deployment(self, dep: Obj) -> Obj:
        key = (dep["metadata"]["namespace"], dep["metadata"]["name"])
        self.deployments[key] = copy.deepcopy(dep)
        return copy.deepcopy(dep)

    def apply_service(self, svc: Obj) -> None:
        self.services.setdefault((svc["metadata"]["namespace"], svc["metadata"]["name"]), svc)

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.deployments[(namespace, name)]["spec"]["replicas"] = replicas
        self.scales.append(replicas)

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        key, value = selector.split("=")
        return [
            copy.deepcopy(p)
            for (ns, _), p in self.pods.items()
            if ns == namespace and p["metadata"]["labels"].get(key) == value
        ]

    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        pod = self.pods.get((namespace, name))
        if pod is not None:
            pod["metadata"].setdefault("annotations", {}).update(annotations)

    def run_controllers(self) -> None:
        """Match pods to each Deployment's replicas, then schedule pending ones."""
        for (ns, _), dep in self.deployments.items():
            sel = dep["spec"]["selector"]["matchLabels"]
            mine = [
                p
                for (pns, _), p in self.pods.items()
                if pns == ns and all(p["metadata"]["labels"].get(k) == v for k, v in sel.items())
            ]
            want = dep["spec"]["replicas"]
            tmpl = dep["spec"]["template"]
            for _ in range(want - len(mine)):
                name = f"{dep['metadata']['name']}-{uuid.uuid4().hex[:5]}"
                self.pods[(ns, name)] = {
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "uid": str(uuid.uuid4()),
                        "labels": dict(tmpl["metadata"]["labels"]),
                    },
                    "spec": copy.deepcopy(tmpl["spec"]),
                    "status": {"phase": "Pending"},
                }
            if len(mine) > want:
                cost = lambda p: int(  # noqa: E731
                    (p["metadata"].get("annotations") or {}).get(DELETION_COST, "0")
                )
                for p in sorted(mine, key=cost)[: len(mine) - want]:
                    del self.pods[(ns, p["metadata"]["name"])]
        for pod in self.pods.values():
            if pod["status"]["phase"] != "Pending" or "nodeSelector" not in pod["spec"]:
                continue
            label = pod["spec"]["nodeSelector"][PRODUCT_LABEL]
            [(resource, need)] = pod["spec"]["containers"][0]["resources"]["limits"].items()
            pool = self.nodes if resource == GPU_RESOURCE else self.fractional.get(resource, [])
            for node in pool:
                used = sum(
                    p["gpus"] for p in self.gpu_pods(resource=resource) if p["node"] == node.name
                )
                if node.product == label and used + int(need) <= node.allocatable:
                    pod["spec"]["nodeName"] = node.name
                    self.ips += 1
                    ip = f"10.0.0.{self.ips}"
                    pod["status"] = {
                        "phase": "Running",
                        "podIP": ip,
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                    break


class Models:
    """A world for the model reconciler: fake cluster, real ledger, manual clock."""

    def __init__(self, tmp: Path, **spec: Any) -> None:
        self.kube = ModelKube(
            [NodeGPUs("gpu-l40s-0", L40S, 4), NodeGPUs("gpu-a100-0", "NVIDIA-A100-SXM4-80GB", 8)]
        )
        pb = yaml.safe_load((ROOT / "examples/pricebook.yaml").read_text())
        self.kube.add_cluster("pricebooks", pb)
        self.kube.add_cluster(
            "accounts", {"metadata": {"name": "acme"}, "spec": {"namespaces": [NS]}}
        )
        self.clock = ManualClock(T0)
        self.ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}", clock=self.clock)
        self.cfg = OperatorConfig()
        self.stats: dict[str, Any] = {}
        self.rec = ModelReconciler(
            self.kube, self.ledger, self.clock, self.cfg, stats=CallableStats(lambda: self.stats)
        )
        base = {
            "model": "llama",
            "image": "vllm/vllm-openai:v0.6.3",
            "gpu": {"product": L40S, "count": 2},
            "visibility": "Private",
            "minReplicas": 0,
            "maxReplicas": 3,
            "scaling": {
                "targetRequestsPerReplica": 10,
                "windowSeconds": 600,
                "coldAfterSeconds": 1800,
            },
        }
        self.md = self.kube.add_namespaced(
            "modeldeployments",
            {
                "apiVersion": "gpucloud.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "llm", "namespace": NS},
                "spec": {**base, **spec},
            },
        )

    def traffic(self, requests: int, queued: int = 0, in_flight: dict[str, int] | None = None):
        self.stats = {
            f"{NS}/llm": {
                "requestsLastWindow": requests,
                "lastRequestAt": self.clock.now().isoformat() if requests else None,
                "inFlight": sum((in_flight or {}).values()),
                "queued": queued,
                "replicas": in_flight or {},
            }
        }

    def quiet(self) -> None:
        last = self.stats.get(f"{NS}/llm", {}).get("lastRequestAt")
        self.traffic(0)
        self.stats[f"{NS}/llm"]["lastRequestAt"] = last

    def tick(self, ensure: bool = False) -> Any:
        """A scaling pass, the controllers acting on it, and a pass to see the result."""
        decision = self.rec.reconcile_named(NS, "llm", ensure=ensure)
        self.kube.run_controllers()
        self.gone()  # the pod events of what the controllers did
        return decision

    def advance(self, seconds: int) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    def status(self) -> Obj:
        return self.kube.namespaced[("modeldeployments", NS, "llm")].get("status", {})

    def pods(self) -> list[Obj]:
        return [p for p in self.kube.pods.values() if p["metadata"]["labels"].get(MODEL_LABEL)]

    def posted(self) -> int:
        return self.ledger.charges_by_resource("acme").get(f"model/{NS}/llm#online", 0)

    def gone(self) -> None:
        """Pods removed by the controller: a pod event per removal (DELETED)."""
        self.rec.pod_changed({"metadata": {"namespace": NS, "labels": {MODEL_LABEL: "llm"}}})


@pytest.fixture
def m(tmp_path: Path) -> Iterator[Models]:
    world = Models(tmp_path)
    yield world
    world.ledger.close()


def price(seconds: int, gpus: int = 2) -> int:
    return to_minor(Decimal("5.20") * gpus * seconds / 3600)


def test_lifecycle_wake_up_down_cold_billed_to_the_fen(m: Models) -> None:
    # Created: Deployment and Service with owner references, cold, nothing billed.
    d = m.tick(ensure=True)
    dep = m.kube.deployments[(NS, deployment_name("llm"))]
    assert d.action == "hold" and dep["spec"]["replicas"] == 0
    assert dep["metadata"]["ownerReferences"][0]["uid"] == m.md["metadata"]["uid"]
    assert m.kube.services and m.status()["state"] == "Cold" and m.pods() == []
    m.advance(3600)
    m.tick()
    assert m.posted() == 0 and m.status()["cost"] == "0.00"

    # A request queued at the cold model wakes one replica on an L40S node.
    m.traffic(1, queued=1)
    d = m.tick()
    assert (d.action, d.desired) == ("wake", 1)
    [pod] = m.pods()
    assert pod["spec"]["nodeName"] == "gpu-l40s-0"
    m.traffic(1)
    m.tick()
    assert m.status()["state"] == "Serving" and m.status()["readyReplicas"] == 1
    assert "Woke" in m.kube.reasons("llm")

    # Load: 25 requests in the window at 10 per replica -> 3 replicas at once; the
    # third cannot be placed (4 L40S, 2 per replica) and stays pending.
    m.advance(100)
    m.traffic(25)
    d = m.tick()
    assert (d.action, d.desired) == ("up", 3)
    assert sum(1 for p in m.pods() if p["status"]["phase"] == "Running") == 2
    m.tick()
    assert m.status()["state"] == "Scaling" and m.status()["readyReplicas"] == 2

    # Quiet: one step down per window; the pending pod is the first victim (no GPU).
    m.quiet()
    m.advance(600)  # t=700
    d = m.tick()
    assert (d.action, d.desired) == ("down", 2) and len(d.victims) == 1
    assert m.status()["state"] in ("Serving", "Scaling")
    running = [p for p in m.pods() if p["status"]["phase"] == "Running"]
    assert len(m.pods()) == 2 and len(running) == 2
    m.advance(300)  # t=1000: less than a window since the last step down
    assert m.tick().action == "hold"
    m.advance(300)  # t=1300
    d = m.tick()
    assert (d.action, d.desired) == ("down", 1)
    victim = d.victims[0]
    assert (NS, victim) not in m.kube.pods
    m.advance(600)  # t=1900: idle 1800 s since the last request at t=100
    d = m.tick()
    assert (d.action, d.desired) == ("cold", 0)
    assert m.pods() == [] and m.status()["state"] == "Cold"
    assert "ScaledUp" in m.kube.reasons("llm") and "WentCold" in m.kube.reasons("llm")
    assert m.kube.reasons("llm").count("ScaledDown") == 2

    # Online: replica 1 t=0..(1300 or 1900), replica 2 t=100..(1300 or 1900), the
    # pending one never ran: 1900 + 1300 - 100 = 3100 replica-seconds x 2 GPUs.
    expected = price(1900 + 1300 - 100)
    assert m.posted() == expected == 896
    assert m.status()["cost"] == "8.96" and m.status()["currency"] == "CNY"

    # Cold: no cost however long; a repeated pass posts nothing twice.
    m.advance(7200)
    m.tick()
    m.tick()
    assert m.posted() == expected
    keys = [e.key for e in m.ledger.entries("acme", limit=100) if e.key.startswith("model-online")]
    assert len(keys) == len(set(keys))


def test_scale_down_marks_victims_and_spares_busy_replicas(m: Models) -> None:
    m.kube.nodes.append(NodeGPUs("gpu-l40s-1", L40S, 4))
    m.traffic(30)
    m.tick(ensure=True)
    m.kube.deployments[(NS, deployment_name("llm"))]["spec"]["replicas"] = 3
    m.tick()
    running = sorted(m.pods(), key=lambda p: p["metadata"]["name"])
    assert len(running) == 3
    busy = {f"http://{p['status']['podIP']}:8000": 2 for p in running[:2]}
    m.quiet()
    m.stats[f"{NS}/llm"]["replicas"] = busy
    m.stats[f"{NS}/llm"]["inFlight"] = 4
    m.advance(600)
    d = m.rec.reconcile_named(NS, "llm")
    assert (d.action, d.desired, d.victims) == ("down", 2, (running[2]["metadata"]["name"],))
    annotations = m.kube.pods[(NS, running[2]["metadata"]["name"])]["metadata"]["annotations"]
    assert annotations[DELETION_COST] == VICTIM_COST
    m.kube.run_controllers()
    assert (NS, running[2]["metadata"]["name"]) not in m.kube.pods


def test_deleting_stops_billing_and_public_models_are_not_billed(tmp_path: Path) -> None:
    m = Models(tmp_path, minReplicas=1)
    m.tick(ensure=True)
    m.tick()
    assert len(m.pods()) == 1 and m.status()["state"] == "Serving"
    m.advance(360)
    m.rec.deleted(m.kube.namespaced[("modeldeployments", NS, "llm")])
    m.advance(3600)
    m.gone()
    assert m.posted() == price(360) == 104
    m.ledger.close()

    (tmp_path / "pub").mkdir()
    pub = Models(
        tmp_path / "pub",
        minReplicas=1,
        visibility="Public",
        pricing={"publisher": "Official", "task": "TextGeneration"},
    )
    pub.tick(ensure=True)
    pub.advance(3600)
    pub.tick()
    assert len(pub.pods()) == 1 and pub.posted() == 0 and "cost" not in pub.status()
    pub.ledger.close()


def test_refused_without_account_and_holds_on_missing_stats(m: Models) -> None:
    m.kube.cluster.pop(("accounts", "acme"))
    m.traffic(5, queued=1)
    assert m.tick(ensure=True) is None
    assert m.kube.deployments[(NS, deployment_name("llm"))]["spec"]["replicas"] == 0
    assert m.status()["state"] == "Cold" and "NoAccount" in m.kube.reasons("llm")
    ready = next(c for c in m.status()["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NoAccount" and "team-a" in ready["message"]

    m.kube.add_cluster("accounts", {"metadata": {"name": "acme"}, "spec": {"namespaces": [NS]}})
    m.tick()
    assert len(m.pods()) == 1

    def broken() -> Any:
        raise StatsError("gateway down")

    m.rec.stats = CallableStats(broken)
    m.stats = {}
    m.advance(5000)
    d = m.tick()
    assert (d.action, d.desired, d.reason) == ("hold", 1, "gateway stats unavailable")
    assert m.posted() == price(5000)  # billing goes on without stats


H100 = "NVIDIA-H100-80GB-HBM3"
MIG, SHARED = f"{H100}-MIG-1g.10gb", f"{H100}-SHARED"


def fractional_world(tmp: Path, product: str, count: int = 1) -> Models:
    """One replica of ``product`` wanted; nodes selling each fractional kind: an H100 split
    7 x 1g.10gb (mixed strategy: labelled as the GPU), one labelled with the profile (the
    single strategy's nvidia.com/gpu) and one time-sliced 4 ways."""
    w = Models(tmp, gpu={"product": product, "count": count}, minReplicas=1)
    w.kube.nodes.append(NodeGPUs("gpu-h100-mig-single", MIG, 7))
    w.kube.fractional = {
        "nvidia.com/mig-1g.10gb": [NodeGPUs("gpu-h100-mig-mixed", H100, 7)],
        "nvidia.com/gpu.shared": [NodeGPUs("gpu-h100-ts", SHARED, 4)],
    }
    return w


def single_strategy(w: Models) -> None:
    """The price book sells the 1g.10gb slice as the single strategy does: nvidia.com/gpu
    on nodes labelled with the profile (a new resourceVersion, as the API server gives)."""
    pb = w.kube.cluster[("pricebooks", "default")]
    [mig] = [g for g in pb["spec"]["gpus"] if g["product"] == MIG]
    mig["resource"] = GPU_RESOURCE
    pb["metadata"]["resourceVersion"] = "2"


@pytest.mark.parametrize(
    ("product", "single", "resource", "label", "node", "per_hour", "fen"),
    [
        (L40S, False, GPU_RESOURCE, L40S, "gpu-l40s-0", "5.20", 144),
        # mixed strategy: the MIG resource on nodes keeping the GPU's own product label
        (MIG, False, "nvidia.com/mig-1g.10gb", H100, "gpu-h100-mig-mixed", "2.83", 79),
        (MIG, True, GPU_RESOURCE, MIG, "gpu-h100-mig-single", "2.83", 79),
        (SHARED, False, "nvidia.com/gpu.shared", SHARED, "gpu-h100-ts", "4.95", 138),
    ],
)  # fmt: skip
def test_a_replica_requests_its_products_resource_and_pays_its_price(
    tmp_path: Path,
    product: str,
    single: bool,
    resource: str,
    label: str,
    node: str,
    per_hour: str,
    fen: int,
) -> None:
    m = fractional_world(tmp_path, product)
    if single:
        single_strategy(m)
    m.tick(ensure=True)
    tmpl = m.kube.deployments[(NS, deployment_name("llm"))]["spec"]["template"]["spec"]
    assert tmpl["containers"][0]["resources"] == {
        "limits": {resource: "1"},
        "requests": {resource: "1"},
    }
    assert tmpl["nodeSelector"] == {PRODUCT_LABEL: label}
    m.tick()
    [pod] = m.pods()
    assert pod["spec"]["nodeName"] == node and m.status()["readyReplicas"] == 1
    # online time at the product's own modelOnlinePerHour, per unit (slice, share, GPU)
    m.advance(1000)
    m.tick()
    assert m.posted() == to_minor(Decimal(per_hour) * 1000 / 3600) == fen
    m.ledger.close()


def test_a_replica_of_a_time_sliced_share_takes_one(tmp_path: Path) -> None:
    m = fractional_world(tmp_path, SHARED, count=2)
    m.tick(ensure=True)
    m.tick()
    assert m.kube.deployments[(NS, deployment_name("llm"))]["spec"]["replicas"] == 0
    assert m.pods() == [] and m.status()["state"] == "Cold"
    ready = next(c for c in m.status()["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "SharedGPUCount"
    assert ready["message"] == (
        f"spec.gpu.count: {SHARED} is a time-sliced share of a GPU; a model replica takes "
        "exactly 1, not 2"
    )
    assert m.kube.reasons("llm").count("SharedGPUCount") == 1  # said once, not per pass
    m.kube.update_spec("modeldeployments", NS, "llm", {"gpu": {"product": SHARED, "count": 1}})
    m.tick(ensure=True)
    m.tick()
    [pod] = m.pods()
    assert pod["spec"]["nodeName"] == "gpu-h100-ts" and m.posted() == 0
    m.ledger.close()


def test_a_deployment_asking_for_the_old_resource_is_rebuilt(tmp_path: Path) -> None:
    # as the operator built it before fractional GPUs: whole GPUs on nodes labelled with
    # the slice's name, which no node is; the next timer pass (not only a spec change)
    # applies it again, asking for the slice (the edge replaces the resources whole)
    m = fractional_world(tmp_path, MIG)
    md = m.kube.namespaced[("modeldeployments", NS, "llm")]
    m.kube.apply_deployment(build_model_deployment(md, replicas=1))
    m.tick()  # the pass, then the Deployment controller and the scheduler
    tmpl = m.kube.deployments[(NS, deployment_name("llm"))]["spec"]["template"]["spec"]
    assert tmpl["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    assert tmpl["nodeSelector"] == {PRODUCT_LABEL: H100}
    [pod] = m.pods()
    assert pod["spec"]["nodeName"] == "gpu-h100-mig-mixed"
    m.ledger.close()


def test_stats_sources(tmp_path: Path) -> None:
    doc = {
        "ns/m": {
            "requestsLastWindow": 3,
            "lastRequestAt": "2026-01-01T00:00:00+00:00",
            "inFlight": 1,
            "queued": 0,
            "replicas": {"http://10.0.0.1:8000": 1},
        }
    }
    got = parse_stats(doc)["ns/m"]
    assert got.requests_last_window == 3 and got.replicas == {"http://10.0.0.1:8000": 1}
    with pytest.raises(StatsError, match=r"stats\[ns/m\]\.queued: must be an int >= 0"):
        parse_stats({"ns/m": {"queued": -1}})
    with pytest.raises(StatsError, match="lastRequestAt: must carry a time zone"):
        parse_stats({"ns/m": {"lastRequestAt": "2026-01-01T00:00:00"}})

    path = tmp_path / "stats.json"
    assert FileStats(path).fetch() == {}
    path.write_text(json.dumps(doc))
    assert isinstance(stats_source(f"file:{path}"), FileStats)
    assert stats_source(f"file:{path}").fetch()["ns/m"].in_flight == 1
    assert isinstance(stats_source("none"), NoStats)
    with pytest.raises(ValueError, match="model_stats_url"):
        stats_source("ftp://x")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200 if self.path == "/v1/stats" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/stats"
        assert isinstance(stats_source(url), HttpStats)
        assert stats_source(url).fetch()["ns/m"].queued == 0
        with pytest.raises(StatsError):
            HttpStats(f"http://127.0.0.1:{server.server_port}/nope").fetch()
    finally:
        server.shutdown()


def test_pod_view_and_config() -> None:
    pending = pod_view({"metadata": {"name": "a", "uid": "1"}, "spec": {}, "status": {}})
    assert pending.pending and not pending.running and not pending.ready
    cfg = OperatorConfig.from_env({"GPUCLOUD_OPERATOR_MODEL_INTERVAL_S": "0.5"})
    assert cfg.model_interval_s == 0.5 and OperatorConfig().model_interval_s == 600
    with pytest.raises(ValueError, match="model_cold_after_s: Input should be greater than 0"):
        OperatorConfig().with_overrides({"model_cold_after_s": "0"})


def test_register_models_wires_handlers_and_timer() -> None:
    import kopf
    from gpucloud_operator.handlers import register_models

    registry = kopf.OperatorRegistry()
    register_models(registry, OperatorConfig(model_interval_s=0.5), object())  # type: ignore[arg-type]
    handlers = [
        *registry._spawning.get_all_handlers(),
        *registry._changing.get_all_handlers(),
        *registry._watching.get_all_handlers(),
    ]
    timers = [h for h in handlers if type(h).__name__ == "TimerHandler"]
    assert {h.selector.any_name: h.interval for h in timers} == {"modeldeployments": 0.5}
    names = {h.selector.any_name for h in handlers if h.selector is not None}
    assert names == {"modeldeployments", "pods"}
    reasons = {str(h.reason) for h in registry._changing.get_all_handlers()}
    assert {"create", "update", "delete"} <= reasons
