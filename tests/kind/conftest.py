"""Fixtures of the kind tier: the cluster (session), a namespace per test, and our chart
installed from our images (``gpucloud_release``, one per session)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kube import delete_namespace
from gpucloud.testing.testbed import REPO

CHART = REPO / "charts" / "gpucloud"
RELEASE_NAMESPACE = "gpucloud-system"
SANDBOX_SECRET = "kind-sandbox-secret"
# The chart on the kind tier: the agents' fake NVML reads the fake device plugin's device
# list on each node; prices that do not divide evenly; checks every second or two, so
# that the flows run in seconds; the sandbox payment provider on.
KIND_VALUES = {
    "agent": {"nvml": "fake", "fakeDevicesFile": "/run/gpucloud-fake-gpu/devices.json"},
    "api": {"sandboxPayments": {"existingSecret": "gpucloud-sandbox"}},
    "operator": {
        "config": {
            "tick_interval_s": 1,
            "account_interval_s": 2,
            "recharge_interval_s": 1,
            "cost_refresh_s": 5,
            "metering_grace_s": 30,
            "preemption_grace_s": 20,
        }
    },
    "pricebook": {
        "gpus": [
            {
                "product": "NVIDIA-H100-80GB-HBM3",
                "payAsYouGoPerHour": "19.80",
                "spotPerHour": "9.90",
                "packages": {"day": "421.37", "week": "2660.00", "month": "10800.00"},
                "modelOnlinePerHour": "19.80",
            },
            {
                "product": "NVIDIA-L40S",
                "payAsYouGoPerHour": "5.17",
                "spotPerHour": "2.59",
                "packages": {"day": "112.37", "week": "700.00", "month": "2800.00"},
                "modelOnlinePerHour": "5.17",
            },
        ],
        "storage": {
            "instancePerGBHour": "0.0005",
            "cloudDiskPerGBHour": "0.0003",
            "imagePerGBHour": "0.0002",
        },
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.kind)


@pytest.fixture(scope="session")
def kind() -> KindCluster:
    cluster = KindCluster()
    cluster.up()
    return cluster


@pytest.fixture
def kind_namespace(kind: KindCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(
        c if c.isalnum() or c == "-" else "-" for c in f"k-{base}-{uuid.uuid4().hex[:5]}"
    )
    kind.kubectl("create", "namespace", name)
    yield name
    delete_namespace(kind, name)  # type: ignore[arg-type]


def helm(kind: KindCluster, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [str(kind.bin.helm), "--kubeconfig", str(kind.kubeconfig), *args],
        env=kind.env(),
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def install_release(
    kind: KindCluster, tmp: Path, values: dict | None = None, release: str = "gpucloud"
) -> None:
    """helm upgrade --install of our chart with our images and the kind values."""
    merged = deep_merge(deep_merge(kind.images().helm_values(), KIND_VALUES), values or {})
    kind.apply(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}},
         {"apiVersion": "v1", "kind": "Secret",
          "metadata": {"name": "gpucloud-sandbox", "namespace": RELEASE_NAMESPACE},
          "stringData": {"secret": SANDBOX_SECRET}}]
    )  # fmt: skip
    path = tmp / f"{release}-values.yaml"
    path.write_text(yaml.safe_dump(merged))
    helm(
        kind, "upgrade", "--install", release, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "-f", str(path), "--wait", "--timeout", "5m",
    )  # fmt: skip


@pytest.fixture(scope="session")
def gpucloud_release(kind: KindCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chart installed with its defaults (SQLite ledger) and our images."""
    install_release(kind, tmp_path_factory.mktemp("helm"))
    return RELEASE_NAMESPACE


def ledger_rows(kind: KindCluster, sql: str, namespace: str = RELEASE_NAMESPACE) -> list[list]:
    """Rows of a read-only query on the SQLite ledger, run inside the API's pod (the file
    lives on its volume): what the API really stored."""
    script = (
        "import json, sqlite3, sys\n"
        "db = sqlite3.connect('file:/var/lib/gpucloud/ledger/ledger.db?mode=ro', uri=True)\n"
        "print(json.dumps([list(r) for r in db.execute(sys.argv[1])]))\n"
    )
    out = kind.kubectl(
        "exec", "-n", namespace, "deploy/gpucloud-api", "--", "python3", "-c", script, sql
    ).stdout
    return json.loads(out)
