"""The chart's life on a real cluster: uninstall keeps only what the docs say it keeps,
an install on PostgreSQL (our image of Debian's server) bills a run to the fen with two
API replicas, and an upgrade to changed values rolls the operator without losing money.
Runs last in the kind tier: it replaces the session's SQLite release."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpucloud.billing import to_minor
from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kindrelease import (
    PRICES,
    RELEASE_NAMESPACE,
    KindHarness,
    helm,
    install_release,
)
from gpucloud.testing.kube import delete_namespace, wait_for

L40S = "NVIDIA-L40S"
GI = "gpuinstances"
DB_NAMESPACE = "gpucloud-db"
DB_URL = f"postgresql+psycopg://gpucloud:kind-db-pw@postgresql.{DB_NAMESPACE}.svc:5432/ledger"
INSTANCE_LABEL = "app.kubernetes.io/instance=gpucloud"


def _release_objects(kind: KindCluster) -> list[str]:
    kinds = (
        "deployments,daemonsets,services,configmaps,secrets,serviceaccounts,"
        "persistentvolumeclaims,roles,rolebindings"
    )
    ns = kind.kubectl("get", kinds, "-n", RELEASE_NAMESPACE, "-l", INSTANCE_LABEL, "-o", "name")
    cluster = kind.kubectl(
        "get", "clusterroles,clusterrolebindings,pricebooks,clusterkopfpeerings",
        "-l", INSTANCE_LABEL, "-o", "name",
    )  # fmt: skip
    return sorted((ns.stdout + cluster.stdout).split())


def _uninstall(kind: KindCluster) -> None:
    helm(kind, "uninstall", "gpucloud", "--namespace", RELEASE_NAMESPACE, "--wait")
    wait_for(
        lambda: not kind.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-o", "name").stdout,
        timeout=120,
        what="the release's pods to go",
    )


def test_uninstall_keeps_only_the_crds_and_the_ledger_claim(
    kind: KindCluster, gpucloud_release: str
) -> None:
    before = _release_objects(kind)
    assert "deployment.apps/gpucloud-operator" in before
    assert "persistentvolumeclaim/gpucloud-ledger" in before
    _uninstall(kind)
    # the ledger's claim is the record of money (helm.sh/resource-policy: keep)
    assert _release_objects(kind) == ["persistentvolumeclaim/gpucloud-ledger"]
    crds = kind.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/gpuinstances.gpucloud.dev" in crds
    kind.kubectl("delete", "pvc", "gpucloud-ledger", "-n", RELEASE_NAMESPACE, "--wait=true")


def _postgresql(kind: KindCluster) -> None:
    image = kind.images_env()["GPUCLOUD_TEST_POSTGRESQL_IMAGE"]
    labels = {"app": "postgresql"}
    kind.kubectl("create", "namespace", DB_NAMESPACE, check=False)
    kind.apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "postgresql", "namespace": DB_NAMESPACE},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [{
                                "name": "postgresql", "image": image,
                                "env": [{"name": "POSTGRES_USER", "value": "gpucloud"},
                                        {"name": "POSTGRES_PASSWORD", "value": "kind-db-pw"},
                                        {"name": "POSTGRES_DB", "value": "ledger"}],
                                "ports": [{"containerPort": 5432}],
                                "readinessProbe": {"tcpSocket": {"port": 5432},
                                                   "periodSeconds": 2},
                                "volumeMounts": [{"name": "data",
                                                  "mountPath": "/var/lib/postgresql/data"}],
                            }],
                            "volumes": [{"name": "data", "emptyDir": {}}],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "postgresql", "namespace": DB_NAMESPACE},
                "spec": {"selector": labels, "ports": [{"port": 5432}]},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "gpucloud-db", "namespace": RELEASE_NAMESPACE},
                "stringData": {"url": DB_URL},
            },
        ]
    )  # fmt: skip
    kind.kubectl(
        "rollout", "status", "deploy/postgresql", "-n", DB_NAMESPACE, "--timeout=120s",
        timeout=130,
    )  # fmt: skip


POSTGRES_VALUES = {
    "database": {"type": "postgresql", "existingSecret": "gpucloud-db"},
    "api": {"replicas": 2},
}


@pytest.fixture(scope="module")
def pg_release(kind: KindCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("pg")
    installed = kind.kubectl(
        "get", "deploy/gpucloud-operator", "-n", RELEASE_NAMESPACE, check=False
    )
    if installed.returncode == 0:
        _uninstall(kind)
    kind.kubectl("create", "namespace", RELEASE_NAMESPACE, check=False)
    _postgresql(kind)
    install_release(kind, tmp, POSTGRES_VALUES)
    yield tmp
    _uninstall(kind)
    delete_namespace(kind, DB_NAMESPACE)  # type: ignore[arg-type]


def test_postgresql_release_bills_a_run_to_the_fen_then_upgrades(
    kind: KindCluster, pg_release: Path, kind_namespace: str
) -> None:
    api = kind.get_json("deploy", "gpucloud-api", "-n", RELEASE_NAMESPACE)
    assert api["status"]["readyReplicas"] == 2
    env = api["spec"]["template"]["spec"]["containers"][0]["env"]
    url = next(e for e in env if e["name"] == "GPUCLOUD_DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"]["name"] == "gpucloud-db"  # never in plain text
    h = KindHarness(kind, kind_namespace, RELEASE_NAMESPACE)
    h.setup()
    try:
        h.pay_online("topup", "50.00")
        assert h.sql("SELECT 1 FROM ledger_accounts WHERE name = ?", h.account) == [[1]]
        h.instance("nb", L40S, 1, ["sleep", "3600"])
        h.wait_phase(GI, "nb", "Running")

        def metered() -> int:
            rows = h.sql("SELECT SUM(measure) FROM ledger_usage WHERE namespace = ?", h.ns)
            return int(rows[0][0] or 0)

        h.wait(lambda: metered() >= 10, "agent usage in PostgreSQL")
        h.patch_spec(GI, "nb", {"state": "Stopped"})
        h.wait_phase(GI, "nb", "Stopped")
        h.wait(lambda: not h.status(GI, "nb").get("unsettledMeters"), "the settlement")
        [(q, posted)] = h.sql(
            "SELECT quantity_rated, posted_minor FROM ledger_meters WHERE resource = ?",
            f"{h.ns}/nb",
        )
        assert int(q) > 0 and posted == to_minor(PRICES[L40S]["payg"] * int(q) / 3600)
        balance = h.balance()
        assert balance == 50_00 - h.charges()

        # upgrade: changed values roll the operator; the money is where it was
        old = kind.get_json("deploy", "gpucloud-operator", "-n", RELEASE_NAMESPACE)
        install_release(
            kind, pg_release, {**POSTGRES_VALUES, "operator": {"config": {"tick_interval_s": 2}}}
        )
        new = kind.get_json("deploy", "gpucloud-operator", "-n", RELEASE_NAMESPACE)
        assert new["metadata"]["generation"] > old["metadata"]["generation"]
        container = new["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["GPUCLOUD_OPERATOR_TICK_INTERVAL_S"] == "2"
        history = json.loads(
            helm(kind, "history", "gpucloud", "-n", RELEASE_NAMESPACE, "-o", "json")
        )
        assert [r["status"] for r in history][-1] == "deployed" and len(history) >= 2
        assert h.balance() == balance
        h.patch_spec(GI, "nb", {"state": "Running"})
        h.wait_phase(GI, "nb", "Running")  # the upgraded operator works
    finally:
        h.close()
