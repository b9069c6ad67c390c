"""Kind tier figures: the cold build (as recorded by the builds), a warm cluster create,
our image sizes, helm install to every pod Ready, the start latency of 20 GPU instances
applied at once beside 20 bare pods with the same GPU requests and claims (and 20 with an
emptyDir instead of the claim: the kubelet's own floor), and the
memory of each component's pod from the kubelet's stats.

Recreates the kind cluster (`make kind` afterwards gives it back with the test values);
`--reuse` keeps the running cluster and measures only the install, the starts and the
memory. `BENCH_DEBUG=1` prints where each instance's start time went.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from gpucloud.testing.kind import KIND_CACHE, KindCluster
from gpucloud.testing.kindrelease import RELEASE_NAMESPACE, KindHarness, install_release
from gpucloud.testing.kube import wait_for
from gpucloud.testing.testbed import CACHE, versions

N = 20
NS = "kind-bench"
GPU_NODES = {"gpucloud-worker": 16, "gpucloud-worker2": 8}  # room for 20 one-GPU runs


def _seconds(name: str) -> int | None:
    f = KIND_CACHE / name
    return int(f.read_text()) if f.exists() else None


def cold_build_seconds() -> int | None:
    """What the kind tier adds to the kwok tier's cold build: its Go tools, the Debian
    bases, the node image, the wheels and our images, the first cluster."""
    v = versions()
    tools = [
        f"kind-{v['KIND_VERSION']}",
        f"kubernetes-node-{v['K8S_VERSION']}",
        f"coredns-{v['COREDNS_VERSION']}",
        f"local-path-provisioner-{v['LOCAL_PATH_PROVISIONER_VERSION']}",
        f"registry-{v['REGISTRY_VERSION']}",
    ]
    parts = [int((CACHE / t / ".build_seconds").read_text()) for t in tools
             if (CACHE / t / ".build_seconds").exists()]  # fmt: skip
    if len(parts) != len(tools):
        return None
    names = [
        "build-seconds-debian-python", "build-seconds-debian-node",
        "build-seconds-debian-netutils", "build-seconds-debian-postgresql",
        "build-seconds-node-image", "build-seconds-wheels", "build-seconds-images",
        "up-seconds",
    ]  # fmt: skip
    recorded = [_seconds(n) for n in names]
    if None in recorded:
        return None
    return sum(parts) + sum(r for r in recorded if r is not None)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _running_times(kind: KindCluster, kind_of: str, names: list[str]) -> dict[str, float]:
    """Creation -> Running of each object, from the API server's own timestamps."""
    out: dict[str, float] = {}

    def done() -> bool:
        items = kind.get_json(kind_of, "-n", NS)["items"]
        for it in items:
            name = it["metadata"]["name"]
            if name not in names or name in out:
                continue
            created = datetime.fromisoformat(it["metadata"]["creationTimestamp"])
            if kind_of == "pods":
                cond = {c["type"]: c for c in it["status"].get("conditions", [])}.get("Ready")
                if cond and cond["status"] == "True":
                    out[name] = (
                        datetime.fromisoformat(cond["lastTransitionTime"]) - created
                    ).total_seconds()
            else:
                st = it.get("status") or {}
                if st.get("phase") == "Running" and st.get("startedAt"):
                    out[name] = (datetime.fromisoformat(st["startedAt"]) - created).total_seconds()
        return len(out) == len(names)

    wait_for(done, timeout=300, interval=0.5, what=f"{len(names)} {kind_of} Running")
    return out


def _timeline(kind: KindCluster) -> None:
    """Where each instance's start went: seconds after the instance's creation at which
    its claim and pod were created, the pod was scheduled, its container started
    (kubelet) and the pod was Ready, from the API server's timestamps."""

    def at(stamp: str | None, created: datetime) -> str:
        if not stamp:
            return "-"
        return f"{(datetime.fromisoformat(stamp) - created).total_seconds():5.1f}"

    items = {i["metadata"]["name"]: i for i in kind.get_json("gpuinstances", "-n", NS)["items"]}
    pods = {p["metadata"]["name"]: p for p in kind.get_json("pods", "-n", NS)["items"]}
    pvcs = {c["metadata"]["name"]: c for c in kind.get_json("pvc", "-n", NS)["items"]}
    print("# instance  claim  pod  scheduled  container  ready  startedAt")
    for name, it in sorted(items.items()):
        created = datetime.fromisoformat(it["metadata"]["creationTimestamp"])
        pod = pods.get(f"{name}-gpu") or {}
        conds = {c["type"]: c for c in (pod.get("status") or {}).get("conditions", [])}
        running = [
            (c.get("state") or {}).get("running", {}).get("startedAt")
            for c in (pod.get("status") or {}).get("containerStatuses", [])
        ]
        claim = (pvcs.get(f"{name}-data") or {}).get("metadata", {}).get("creationTimestamp")
        pod_created = pod.get("metadata", {}).get("creationTimestamp")
        print(
            f"# {name:8} {at(claim, created)} {at(pod_created, created)}"
            f" {at(conds.get('PodScheduled', {}).get('lastTransitionTime'), created)}"
            f" {at(running[0] if running else None, created)}"
            f" {at(conds.get('Ready', {}).get('lastTransitionTime'), created)}"
            f" {at((it.get('status') or {}).get('startedAt'), created)}"
        )


def _set_fake_gpus(kind: KindCluster, counts: dict[str, int]) -> None:
    for node, count in counts.items():
        kind.kubectl("label", "node", node, f"gpucloud.dev/fake-gpu.count={count}", "--overwrite")
    kind.kubectl("delete", "pod", "-n", "kube-system", "-l", "app=fake-gpu-device-plugin")

    def allocatable() -> bool:
        nodes = {n["metadata"]["name"]: n for n in kind.get_json("nodes")["items"]}
        return all(
            nodes[n]["status"]["allocatable"].get("nvidia.com/gpu") == str(c)
            for n, c in counts.items()
        )

    wait_for(allocatable, timeout=120, what="the new fake GPU counts")


def _bare(i: int, product: str, busybox: str) -> list[dict]:
    """A pod like an instance's: GPUs, product selector, a pre-bound node-local claim."""
    name = f"bare-{i}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{NS}-{name}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "bench",
            "hostPath": {"path": f"/var/lib/gpucloud-bench/{name}", "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": NS, "name": name},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "bench",
            "volumeName": pv["metadata"]["name"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeSelector": {"nvidia.com/gpu.product": product},
                 "containers": [{"name": "main", "image": busybox, "command": ["sleep", "3600"],
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}},
                                 "volumeMounts": [{"name": "data", "mountPath": "/root/data"}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]},
    }  # fmt: skip
    return [pv, pvc, pod]


def _without_claim(pod: dict) -> dict:
    spec = pod["spec"]
    return {**pod, "metadata": dict(pod["metadata"]),
            "spec": {**spec, "volumes": [{"name": "data", "emptyDir": {}}]}}  # fmt: skip


def main() -> None:
    reuse = "--reuse" in sys.argv[1:]
    kind = KindCluster()
    kind.up()  # builds what is missing
    if not reuse:
        if (cold := cold_build_seconds()) is not None:
            print(f"kind_cold_build_s: {cold} s")
        subprocess.run(["bash", "hack/kind/kind.sh", "down"], check=True, env=kind.env())
        t0 = time.monotonic()
        kind.up()  # a warm create from scratch
        print(f"kind_warm_create_s: {time.monotonic() - t0:.1f} s")
        for c in ("operator", "api", "gateway", "agent", "fake-model-server"):
            size = subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", f"gpucloud/{c}:0.1.0"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            print(f"image_{c.replace('-', '_')}_mib: {int(size) / 2**20:.0f} MiB")

    with TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        install_release(kind, Path(tmp))
        print(f"kind_install_ready_s: {time.monotonic() - t0:.1f} s")

    _set_fake_gpus(kind, GPU_NODES)
    # a namespace left by an earlier run (--reuse) may still be terminating
    kind.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=300)
    kind.kubectl("create", "namespace", NS)
    h = KindHarness(kind, NS, RELEASE_NAMESPACE)
    h.setup(instance_limit=N)
    h.pay_online("fund", "100000.00")
    busybox = kind.busybox_image()
    products = ["NVIDIA-H100-80GB-HBM3"] * 12 + ["NVIDIA-L40S"] * 8
    docs = []
    for i, product in enumerate(products):
        docs.append({
            "apiVersion": "gpucloud.dev/v1alpha1", "kind": "GPUInstance",
            "metadata": {"name": f"gi-{i}", "namespace": NS},
            "spec": {"gpu": {"product": product, "count": 1}, "billing": {"mode": "PayAsYouGo"},
                     "storage": {"quotaGi": 10}, "image": busybox, "command": ["sleep", "3600"],
                     "state": "Running"},
        })  # fmt: skip
    kind.apply(docs)
    gi = _running_times(kind, "gpuinstances", [f"gi-{i}" for i in range(N)])
    print(f"kind_instance_running_p95_s: {p95(list(gi.values())):.1f} s")
    print(f"kind_instance_running_p50_s: {statistics.median(gi.values()):.1f} s")
    if os.environ.get("BENCH_DEBUG"):
        _timeline(kind)
    kind.kubectl("delete", "gpuinstances", "--all", "-n", NS, "--wait=true", timeout=300)

    bare = [d for i, p in enumerate(products) for d in _bare(i, p, busybox)]
    kind.apply(bare)
    pods = _running_times(kind, "pods", [f"bare-{i}" for i in range(N)])
    print(f"kind_bare_pod_running_p95_s: {p95(list(pods.values())):.1f} s")
    print(f"kind_start_overhead_ratio: {p95(list(gi.values())) / p95(list(pods.values())):.2f}")
    kind.kubectl("delete", "pods", "--all", "-n", NS, "--wait=true", timeout=300)

    # The kubelet's own floor: the same pods with an emptyDir instead of a claim, so no
    # PV controller in the way; what instances take beyond this is the operator's share.
    plain = [_without_claim(d) for d in bare if d["kind"] == "Pod"]
    for d in plain:
        d["metadata"]["name"] = d["metadata"]["name"].replace("bare-", "plain-")
    kind.apply(plain)
    floor = _running_times(kind, "pods", [f"plain-{i}" for i in range(N)])
    print(f"kind_plain_pod_running_p95_s: {p95(list(floor.values())):.1f} s")

    summary = {}
    for node in kind.get_json("nodes")["items"]:
        stats = json.loads(
            kind.kubectl(
                "get", "--raw", f"/api/v1/nodes/{node['metadata']['name']}/proxy/stats/summary"
            ).stdout
        )
        for pod in stats.get("pods", []):
            ref = pod["podRef"]
            if ref["namespace"] == RELEASE_NAMESPACE and pod.get("memory"):
                component = ref["name"].split("-")[1]
                summary.setdefault(component, []).append(pod["memory"]["workingSetBytes"])
    for component, values in sorted(summary.items()):
        print(f"kind_{component}_pod_memory_mib: {max(values) / 2**20:.0f} MiB")

    kind.kubectl("delete", "namespace", NS, "--wait=true", timeout=300)
    kind.kubectl("delete", "pv", *[f"{NS}-bare-{i}" for i in range(N)], check=False)
    kind.kubectl("delete", "account", NS, check=False)
    _set_fake_gpus(kind, {"gpucloud-worker": 8, "gpucloud-worker2": 4})


if __name__ == "__main__":
    main()
