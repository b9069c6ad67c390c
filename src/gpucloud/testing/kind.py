"""The kind tier: a real Kubernetes cluster in Docker with fake GPU devices.

``hack/kind/kind.sh up`` builds (or reuses) the node image, the local registry and the
cluster, and pushes our images; this module drives it for tests and demos, with the
same ``kubectl``/``apply`` surface as :class:`gpucloud.testing.testbed.Testbed`.

    python -m gpucloud.testing.kind up      # start or reuse; prints the kubeconfig path
    python -m gpucloud.testing.kind down

Nodes (hack/kind/cluster.yaml): a control plane, ``gpucloud-worker`` with 8 fake H100s,
``gpucloud-worker2`` with 4 fake L40S, ``gpucloud-worker3`` without GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpucloud.testing.testbed import REPO, Binaries, KubectlClient

KIND_SCRIPT = REPO / "hack" / "kind" / "kind.sh"
IMAGES_ENV = REPO / "build" / "images.env"
CLUSTER = os.environ.get("KIND_CLUSTER", "gpucloud")
KIND_CACHE = Path(
    os.environ.get("GPUCLOUD_KIND_CACHE", Path.home() / ".cache" / "gpucloud" / "kind")
)
# Where the fake device plugin writes its node's GPUs (hack/kind/manifests).
DEVICES_FILE = "/run/gpucloud-fake-gpu/devices.json"


@dataclass(frozen=True)
class Images:
    """Our images as ``make images`` pushed them: registry and content tag."""

    registry: str
    tag: str

    def ref(self, component: str) -> str:
        return f"{self.registry}/gpucloud/{component}:{self.tag}"

    def helm_values(self) -> dict:
        """Chart values that install exactly these images."""
        return {"global": {"imageRegistry": self.registry, "imageTag": self.tag}}


class KindCluster(KubectlClient):
    """Start or reuse the kind cluster; run kubectl, helm and docker against it."""

    def __init__(self, name: str = CLUSTER) -> None:
        self.name = name
        self.kubeconfig = KIND_CACHE / f"{name}.kubeconfig"
        self.bin = Binaries.from_cache()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KIND_CLUSTER"] = self.name
        return env

    def up(self, timeout: float = 3600) -> Path:
        """Build what is missing, create or reuse the cluster, push our images. A cold
        machine builds for many minutes; the log goes to the kind cache."""
        KIND_CACHE.mkdir(parents=True, exist_ok=True)
        log = KIND_CACHE / f"{self.name}-up.log"
        with log.open("w") as out:
            proc = subprocess.run(
                ["bash", str(KIND_SCRIPT), "up"],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"hack/kind/kind.sh up failed (full log: {log}):\n{tail}")
        return self.kubeconfig

    def down(self) -> None:
        subprocess.run(["bash", str(KIND_SCRIPT), "down"], env=self.env(), check=True)

    def images_env(self) -> dict[str, str]:
        """build/images.env: our images' registry and tag, and the test images'."""
        return dict(line.split("=", 1) for line in IMAGES_ENV.read_text().split() if "=" in line)

    def images(self) -> Images:
        values = self.images_env()
        return Images(values["GPUCLOUD_IMAGE_REGISTRY"], values["GPUCLOUD_IMAGE_TAG"])

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def docker_exec(self, node: str, *cmd: str, timeout: float = 60) -> str:
        """Run a command in a node's container (the node's own filesystem)."""
        return subprocess.run(
            ["docker", "exec", node, *cmd],
            text=True,
            capture_output=True,
            check=True,
            timeout=timeout,
        ).stdout

    def preloaded_image(self, key: str) -> str:
        """An image the node image carries (hack/kind/node-image.sh writes the list)."""
        text = self.docker_exec(f"{self.name}-control-plane", "cat", "/kind/manifests/images.env")
        return dict(line.split("=", 1) for line in text.split())[key]

    def busybox_image(self) -> str:
        """Debian's busybox, preloaded on every node: a tenant's root image in tests."""
        return self.preloaded_image("BUSYBOX_IMAGE")

    def node_devices(self, node: str) -> dict:
        """The fake device plugin's view of a node: product, count and GPU UUIDs."""
        return json.loads(self.docker_exec(node, "cat", DEVICES_FILE))

    def gpu_nodes(self) -> dict[str, int]:
        """Node name -> allocatable nvidia.com/gpu, for nodes that have GPUs."""
        out = {}
        for node in self.get_json("nodes")["items"]:
            gpus = int(node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"))
            if gpus:
                out[node["metadata"]["name"]] = gpus
        return out


class KindFileClock:
    """The chart's ``testing.fileClock`` on the kind tier: one file of POSIX seconds at the
    same path on every node, which the operator, API and gateway pods mount. Writing it
    on every node means it does not matter where those pods were scheduled."""

    def __init__(self, cluster: KindCluster, path: str = "/var/lib/gpucloud-testing/clock"):
        self.cluster, self.path = cluster, path
        self._now: datetime | None = None

    def _nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.cluster.get_json("nodes")["items"]]

    def set(self, when: datetime) -> datetime:
        seconds = int(when.timestamp())
        folder = self.path.rsplit("/", 1)[0]
        tmp = f"{self.path}.tmp"
        script = f"mkdir -p {folder} && echo {seconds} > {tmp} && mv {tmp} {self.path}"
        for node in self._nodes():
            self.cluster.docker_exec(node, "sh", "-c", script)
        self._now = datetime.fromtimestamp(seconds, UTC)
        return self._now

    def now(self) -> datetime:
        assert self._now is not None, "set the clock first"
        return self._now

    def advance(self, seconds: float) -> datetime:
        return self.set(self.now() + timedelta(seconds=seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down"])
    args = p.parse_args(argv)
    cluster = KindCluster()
    if args.command == "up":
        print(cluster.up())
    else:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
