"""The kind tier itself: real nodes, real kubelets with our fake GPU device plugin, a pod
network across nodes, DNS, Services, a default StorageClass, and our agent metering a
pod through the kubelet's pod-resources API into the metering API's ledger."""

from __future__ import annotations

import json
import re

from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kube import wait_for

GPU_NODES = {
    "gpucloud-worker": ("NVIDIA-H100-80GB-HBM3", 8),
    "gpucloud-worker2": ("NVIDIA-L40S", 4),
}
CPU_NODE = "gpucloud-worker3"
UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _pod(name: str, image: str, command: list[str], gpus: int = 0, node: str = "") -> dict:
    spec: dict = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": image, "command": command}],
    }
    if gpus:
        spec["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _phase(kind: KindCluster, ns: str, name: str) -> str:
    return kind.get_json("pod", name, "-n", ns)["status"].get("phase", "")


def test_nodes_are_ready_with_the_gpus_the_device_plugin_advertises(kind: KindCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in kind.get_json("nodes")["items"]}
    assert set(nodes) == {"gpucloud-control-plane", *GPU_NODES, CPU_NODE}
    for name, node in nodes.items():
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", name
    for name, (product, count) in GPU_NODES.items():
        labels = nodes[name]["metadata"]["labels"]
        # the labels GPU Feature Discovery sets, written by our device plugin
        assert labels["nvidia.com/gpu.product"] == product
        assert labels["nvidia.com/gpu.count"] == str(count)
        assert labels["nvidia.com/gpu.present"] == "true"
        assert nodes[name]["status"]["allocatable"]["nvidia.com/gpu"] == str(count)
        devices = kind.node_devices(name)
        assert devices["node"] == name and len(set(devices["uuids"])) == count
        assert all(UUID.match(u) for u in devices["uuids"])
    assert "nvidia.com/gpu" not in nodes[CPU_NODE]["status"]["allocatable"]
    classes = kind.get_json("storageclass")["items"]
    default = [
        c["metadata"]["name"]
        for c in classes
        if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class")
        == "true"
    ]
    assert default == ["standard"]


def test_a_pod_asking_two_gpus_gets_two_uuids_of_its_node(
    kind: KindCluster, kind_namespace: str
) -> None:
    image = kind.images().ref("agent")
    script = "import os; print(os.environ.get('NVIDIA_VISIBLE_DEVICES', ''))"
    kind.apply([_pod("two-gpus", image, ["python3", "-c", script], gpus=2)], "-n", kind_namespace)
    wait_for(
        lambda: _phase(kind, kind_namespace, "two-gpus") == "Succeeded",
        timeout=120,
        what="the 2-GPU pod to finish",
    )
    node = kind.get_json("pod", "two-gpus", "-n", kind_namespace)["spec"]["nodeName"]
    uuids = kind.kubectl("logs", "two-gpus", "-n", kind_namespace).stdout.strip().split(",")
    assert len(uuids) == 2 and len(set(uuids)) == 2
    assert set(uuids) <= set(kind.node_devices(node)["uuids"])


def test_a_pod_asking_more_gpus_than_any_node_has_stays_pending(
    kind: KindCluster, kind_namespace: str
) -> None:
    image = kind.images().ref("agent")
    kind.apply([_pod("nine-gpus", image, ["sleep", "600"], gpus=9)], "-n", kind_namespace)

    def unschedulable() -> str:
        pod = kind.get_json("pod", "nine-gpus", "-n", kind_namespace)
        cond = {c["type"]: c for c in pod["status"].get("conditions", [])}.get("PodScheduled")
        if cond and cond["status"] == "False" and cond.get("reason") == "Unschedulable":
            return cond["message"]
        return ""

    message = str(wait_for(unschedulable, timeout=60, what="the scheduler's verdict"))
    assert "Insufficient nvidia.com/gpu" in message
    assert _phase(kind, kind_namespace, "nine-gpus") == "Pending"


def test_pods_on_different_nodes_reach_each_other_through_a_service(
    kind: KindCluster, kind_namespace: str
) -> None:
    """podnet routes between nodes; kube-proxy serves the Service; CoreDNS names it."""
    server = _pod(
        "echo",
        kind.images().ref("fake-model-server"),
        ["python3", "-m", "gpucloud_gateway.fake_model_server", "--host", "0.0.0.0",
         "--port", "8000", "--model", "echo"],
        node=CPU_NODE,
    )  # fmt: skip
    server["metadata"]["labels"] = {"app": "echo"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8000}]},
    }
    kind.apply([server, service], "-n", kind_namespace)
    url = f"http://echo.{kind_namespace}.svc.cluster.local/healthz"
    script = (
        "import json, time, urllib.request\n"
        "for _ in range(60):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen({url!r}, timeout=2).read().decode()); break\n"
        "    except OSError: time.sleep(1)\n"
    )
    client_node = next(iter(GPU_NODES))
    kind.apply(
        [_pod("client", kind.images().ref("agent"), ["python3", "-c", script], node=client_node)],
        "-n",
        kind_namespace,
    )
    wait_for(
        lambda: _phase(kind, kind_namespace, "client") in ("Succeeded", "Failed"),
        timeout=120,
        what="the client pod",
    )
    body = kind.kubectl("logs", "client", "-n", kind_namespace).stdout
    assert json.loads(body)["model"] == "echo"


def test_a_claim_of_the_default_storage_class_binds_and_keeps_files(
    kind: KindCluster, kind_namespace: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    image = kind.images().ref("agent")
    writer = _pod("writer", image, ["sh", "-c", "echo kept > /data/f"], node=CPU_NODE)
    reader = _pod("reader", image, ["cat", "/data/f"], node=CPU_NODE)
    for pod in (writer, reader):
        pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/data"}]
        pod["spec"]["volumes"] = [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]
        pod["spec"]["securityContext"] = {"fsGroup": 10001}
    kind.apply([claim, writer], "-n", kind_namespace)
    wait_for(lambda: _phase(kind, kind_namespace, "writer") == "Succeeded", timeout=120,
             what="the writer pod")  # fmt: skip
    assert kind.get_json("pvc", "data", "-n", kind_namespace)["status"]["phase"] == "Bound"
    kind.apply([reader], "-n", kind_namespace)
    wait_for(lambda: _phase(kind, kind_namespace, "reader") == "Succeeded", timeout=120,
             what="the reader pod")  # fmt: skip
    assert kind.kubectl("logs", "reader", "-n", kind_namespace).stdout.strip() == "kept"
