"""The test bed: a real Kubernetes control plane with fake GPU nodes, as local processes.

kwokctl's binary runtime starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok's controller (fake kubelets) from binaries built from Go
modules by ``hack/testbed/build.sh``; nothing is fetched at create time. Nodes carry
``nvidia.com/gpu`` capacity and the labels GPU Feature Discovery sets, so pods that
request GPUs are scheduled for real and turn Running.

    python -m gpucloud.testing.testbed up      # start or reuse; prints the kubeconfig path
    python -m gpucloud.testing.testbed down    # delete the cluster
    python -m gpucloud.testing.testbed status

Node mix: ``GPUCLOUD_TESTBED_NODES`` is a comma list of ``PRODUCT:NODES:GPUS_PER_NODE``
(``cpu:NODES`` for CPU-only nodes); the default has 5 GPU nodes of 4 products and one
CPU-only node.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpucloud import gpu_kinds as gk

REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "hack" / "testbed" / "build.sh"
VERSIONS_FILE = REPO / "hack" / "testbed" / "versions.env"
CLUSTER = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud")
CACHE = Path(
    os.environ.get("GPUCLOUD_TESTBED_CACHE", Path.home() / ".cache" / "gpucloud" / "testbed")
)
KUBECONFIG = Path(
    os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", Path.home() / ".kube" / "gpucloud-testbed.yaml")
)

# GPU Feature Discovery's product label value -> memory in MiB as NVML reports it.
GPU_MEMORY_MIB = {
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-L40S": 46068,
    "NVIDIA-GeForce-RTX-4090": 24564,
}
SHORT_NAMES = {
    "NVIDIA-H100-80GB-HBM3": "h100",
    "NVIDIA-A100-SXM4-80GB": "a100",
    "NVIDIA-L40S": "l40s",
    "NVIDIA-GeForce-RTX-4090": "rtx4090",
}
DEFAULT_NODES = (
    "NVIDIA-A100-SXM4-80GB:2:8,NVIDIA-H100-80GB-HBM3:1:8,"
    "NVIDIA-L40S:1:4,NVIDIA-GeForce-RTX-4090:1:4,cpu:1"
)
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


def versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


@dataclass(frozen=True)
class Binaries:
    kwokctl: Path
    kwok: Path
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    helm: Path

    @classmethod
    def from_cache(cls, cache: Path = CACHE) -> Binaries:
        v = versions()
        kwok = cache / f"kwok-{v['KWOK_VERSION']}"
        kube = cache / f"kubernetes-{v['K8S_VERSION']}"
        return cls(
            kwokctl=kwok / "kwokctl",
            kwok=kwok / "kwok",
            etcd=cache / f"etcd-{v['ETCD_VERSION']}" / "etcd",
            kube_apiserver=kube / "kube-apiserver",
            kube_controller_manager=kube / "kube-controller-manager",
            kube_scheduler=kube / "kube-scheduler",
            kubectl=kube / "kubectl",
            helm=cache / f"helm-{v['HELM_VERSION']}" / "helm",
        )

    def missing(self, *, with_helm: bool = False) -> list[Path]:
        """Binaries not built yet; helm is needed only by the chart's tests."""
        return [
            p for name, p in vars(self).items() if (with_helm or name != "helm") and not p.is_file()
        ]


@dataclass(frozen=True)
class NodeSpec:
    """A fake node. ``mig``: MIG devices besides the ``gpus`` whole GPUs, as the device
    plugin's mixed strategy advertises them (``nvidia.com/mig-<profile>``); ``replicas``:
    every GPU time-sliced that many ways (``nvidia.com/gpu.shared``, renameByDefault),
    the node labelled ``<GPU>-SHARED`` as GPU Feature Discovery does."""

    name: str
    product: str | None  # None: a CPU-only node
    gpus: int
    mig: tuple[str, ...] = ()  # one profile per MIG device, e.g. ("1g.10gb",) * 7
    replicas: int = 0


def parse_fraction(text: str) -> dict[str, Any]:
    """A node mix's 4th part: ``mig=7x1g.10gb[+1x3g.40gb]`` or ``shared=4``."""
    key, _, value = text.partition("=")
    if key == "shared" and value.isdigit() and int(value) > 1:
        return {"replicas": int(value)}
    if key == "mig" and value:
        mig: list[str] = []
        for part in value.split("+"):
            n, _, profile = part.partition("x")
            if not n.isdigit() or not re.fullmatch(gk.PROFILE_PATTERN, profile):
                raise ValueError(f"GPUCLOUD_TESTBED_NODES: {part!r} is not COUNTxPROFILE")
            mig += [profile] * int(n)
        return {"mig": tuple(mig)}
    raise ValueError(f"GPUCLOUD_TESTBED_NODES: {text!r} is not mig=NxPROFILE or shared=N")


def parse_node_mix(spec: str = "") -> list[NodeSpec]:
    spec = spec or os.environ.get("GPUCLOUD_TESTBED_NODES", DEFAULT_NODES)
    nodes: list[NodeSpec] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if parts[0] == "cpu":
            count = int(parts[1]) if len(parts) > 1 else 1
            nodes += [NodeSpec(f"cpu-{i}", None, 0) for i in range(count)]
            continue
        if len(parts) not in (3, 4):
            raise ValueError(
                f"GPUCLOUD_TESTBED_NODES: {item!r} is not PRODUCT:NODES:GPUS[:mig=..|shared=N]"
            )
        product, count, gpus = parts[0], int(parts[1]), int(parts[2])
        extra = parse_fraction(parts[3]) if len(parts) == 4 else {}
        short = SHORT_NAMES.get(product, product.lower().replace("nvidia-", ""))[:20]
        kind = "-mig" if "mig" in extra else "-ts" if extra else ""
        nodes += [NodeSpec(f"gpu-{short}{kind}-{i}", product, gpus, **extra) for i in range(count)]
    return nodes


def build_node(spec: NodeSpec) -> dict:
    """A Node object as a kwok-managed fake kubelet with GFD labels would publish it."""
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "2Ti"}
    if spec.product:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": spec.product,
            "nvidia.com/gpu.memory": str(GPU_MEMORY_MIB.get(spec.product, 16384)),
            "nvidia.com/gpu.count": str(spec.gpus),
            "gpucloud.dev/gpu-node": "true",
        }
        resources["nvidia.com/gpu"] = str(spec.gpus)
        if spec.mig:
            labels["nvidia.com/mig.strategy"] = "mixed"
            labels["nvidia.com/gpu.count"] = str(spec.gpus + len(gk.pack_mig(list(spec.mig))))
            for profile in sorted(set(spec.mig)):
                n = str(spec.mig.count(profile))
                labels[f"nvidia.com/mig-{profile}.count"] = n
                resources[f"{gk.MIG_RESOURCE_PREFIX}{profile}"] = n
        if spec.replicas:
            labels["nvidia.com/gpu.product"] = gk.shared_product(spec.product)
            labels["nvidia.com/gpu.replicas"] = str(spec.replicas)
            resources[gk.SHARED_RESOURCE] = str(spec.gpus * spec.replicas)
            resources["nvidia.com/gpu"] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
            },
        },
    }


def kwokctl_config(b: Binaries, controller_qps: int | None = None) -> dict:
    """kwokctl's configuration. ``controller_qps`` raises kube-controller-manager's client
    rate limit (default 20 requests/s, burst 30), as large clusters do; None keeps it."""
    v = versions()
    patches = []
    if controller_qps is not None:
        patches.append(
            {
                "name": "kube-controller-manager",
                # appended (kwokctl sets neither flag; "override" only replaces a set one)
                "extraArgs": [
                    {"key": "kube-api-qps", "value": str(controller_qps)},
                    {"key": "kube-api-burst", "value": str(controller_qps * 3 // 2)},
                ],
            }
        )
    config: dict = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "bindAddress": "127.0.0.1",
            "kubeVersion": v["K8S_VERSION"],
            "kwokVersion": v["KWOK_VERSION"],
            "etcdVersion": v["ETCD_VERSION"].removeprefix("v"),
            "kubeApiserverBinary": str(b.kube_apiserver),
            "kubeControllerManagerBinary": str(b.kube_controller_manager),
            "kubeSchedulerBinary": str(b.kube_scheduler),
            "kubectlBinary": str(b.kubectl),
            "kwokControllerBinary": str(b.kwok),
            "etcdBinary": str(b.etcd),
            "kubeAuthorization": True,  # RBAC is enforced, as in a real cluster
            "quietPull": True,
        },
    }
    if patches:
        config["componentsPatches"] = patches
    return config


class KubectlClient:
    """kubectl against one cluster: ``bin`` (our built binaries), ``kubeconfig`` and
    ``env()`` are the cluster's (the kwok test bed, the kind tier)."""

    bin: Binaries
    kubeconfig: Path

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            cmd, input=input, env=self.env(), text=True, capture_output=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def apply(self, manifests: list[dict] | str, *extra: str, timeout: float = 60) -> str:
        text = manifests if isinstance(manifests, str) else yaml.safe_dump_all(manifests)
        return self.kubectl("apply", "-f", "-", *extra, input=text, timeout=timeout).stdout


class Testbed(KubectlClient):
    """Start, reuse and stop the kwok cluster; run kubectl against it."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        name: str = CLUSTER,
        kubeconfig: Path = KUBECONFIG,
        binaries: Binaries | None = None,
        controller_qps: int | None = None,
    ) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.bin = binaries or Binaries.from_cache()
        self.controller_qps = controller_qps

    # -- processes ---------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin.kubectl.parent}{os.pathsep}{env.get('PATH', '')}"
        env["KWOK_KUBECTL_BINARY"] = str(self.bin.kubectl)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kwokctl(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin.kwokctl), "--name", self.name, *args],
            env=self.env(),
            text=True,
            capture_output=True,
            check=check,
            timeout=timeout,
        )

    # -- lifecycle ---------------------------------------------------------------
    def ensure_binaries(self, *, with_helm: bool = False) -> None:
        if self.bin.missing(with_helm=with_helm):
            print(f"building test bed binaries into {CACHE} (cold: many minutes)", file=sys.stderr)
            subprocess.run(["bash", str(BUILD_SCRIPT), "all"], check=True)
            if missing := self.bin.missing(with_helm=with_helm):
                raise RuntimeError(f"test bed binaries still missing: {missing}")

    def healthy(self) -> bool:
        if not self.kubeconfig.exists():
            return False
        try:
            proc = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and proc.stdout.strip() == "ok"

    def up(self, nodes: list[NodeSpec] | None = None, timeout: float = 180) -> Path:
        """Start the cluster, or reuse a healthy one; returns the kubeconfig path."""
        self.ensure_binaries()
        if not self.healthy():
            self.kwokctl("delete", "cluster", check=False)
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(kwokctl_config(self.bin, self.controller_qps), f)
                config = f.name
            try:
                proc = self.kwokctl(
                    "create",
                    "cluster",
                    "--config",
                    config,
                    "--wait",
                    f"{int(timeout)}s",
                    check=False,
                    timeout=timeout + 60,
                )
            finally:
                os.unlink(config)
            if proc.returncode != 0:
                raise RuntimeError(f"kwokctl create cluster failed:\n{proc.stderr[-4000:]}")
            self.write_kubeconfig()
        self.wait_ready(timeout)
        # hundreds of nodes (the scale bench) take longer than one minute on a busy box
        self.apply([build_node(n) for n in (nodes or parse_node_mix())], timeout=timeout)
        self.wait_nodes_ready(timeout)
        return self.kubeconfig

    def write_kubeconfig(self) -> None:
        text = self.kwokctl("get", "kubeconfig").stdout
        self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(self.kubeconfig)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError("the test bed's API server did not become ready")
            time.sleep(0.5)
        # The default ServiceAccount is created by the controller manager; tests need it.
        while (
            self.kubectl(
                "get", "serviceaccount", "default", "-n", "default", check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the controller manager did not create ServiceAccounts")
            time.sleep(0.5)

    def wait_nodes_ready(self, timeout: float) -> None:
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            "node",
            "--all",
            f"--timeout={int(timeout)}s",
            timeout=timeout + 10,
        )

    def down(self) -> None:
        self.kwokctl("delete", "cluster", check=False)
        self.kubeconfig.unlink(missing_ok=True)

    def nodes(self) -> Iterator[dict]:
        out = self.kubectl("get", "nodes", "-o", "json").stdout
        yield from json.loads(out)["items"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpucloud.testing.testbed",
        description="The kwok test bed with fake GPU nodes.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "build", "kubeconfig"])
    args = parser.parse_args(argv)
    tb = Testbed()
    if args.command == "build":
        tb.ensure_binaries()
    elif args.command == "up":
        t0 = time.monotonic()
        path = tb.up()
        print(f"test bed ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(f"export KUBECONFIG={path}", file=sys.stderr)
        print(path)
    elif args.command == "down":
        tb.down()
    elif args.command == "kubeconfig":
        print(tb.kubeconfig)
    else:
        if not tb.healthy():
            print("test bed: not running")
            return 1
        for node in tb.nodes():
            labels = node["metadata"]["labels"]
            gpus = node["status"]["capacity"].get("nvidia.com/gpu", "0")
            print(
                f"{node['metadata']['name']:<22} {labels.get('nvidia.com/gpu.product', '-'):<26}"
                f" gpus={gpus}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
