"""`helm install` into the kwok test bed with the real helm, then least-privilege proof
with `kubectl auth can-i --as` against the installed RBAC, then `helm uninstall`.

The CRDs are cluster-scoped and shared with every other test: the `testbed` fixture
applies crds/, this test adds Kopf's peering CRDs if missing, installs with
--skip-crds and never deletes a CRD.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from charttools import helm, install, uninstall

from gpucloud.testing.kube import get_json, wait_for
from gpucloud.testing.testbed import REPO, Testbed

pytestmark = pytest.mark.e2e
CLUSTER_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "PriceBook",
    "ClusterKopfPeering",
    "PersistentVolume",
}


def can(tb: Testbed, who: str, verb: str, resource: str, *extra: str) -> bool:
    proc = tb.kubectl("auth", "can-i", verb, resource, "--as", who, *extra, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.fixture
def release(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    name = f"gc{uuid.uuid4().hex[:6]}"
    other = f"{namespace}-other"
    testbed.kubectl("create", "namespace", other)
    info = {
        "name": name,
        "namespace": namespace,
        "other": other,
        "tenant": f"tenant-{name}",
        "admin": f"billing-{name}",
        "account": f"acct-{name}",
        "tmp": tmp_path,
    }
    install(
        testbed, name, namespace, tmp_path,
        "--set", f"pricebook.name={name}",
        "--set", f"rbac.billingAdmins.users={{{info['admin']}}}",
        "--set-json",
        f'rbac.accountReaders=[{{"account": "{info["account"]}", "users": ["{info["tenant"]}"]}}]',
        "--set", "agent.nvml=fake",
    )  # fmt: skip
    try:
        yield info
    finally:
        uninstall(testbed, name, namespace, tmp_path)
        testbed.kubectl("delete", "namespace", other, "--wait=false", check=False)


def manifest(tb: Testbed, rel: dict[str, Any]) -> list[dict[str, Any]]:
    proc = helm("get", "manifest", rel["name"], "--namespace", rel["namespace"],
                tmp=rel["tmp"], kubeconfig=tb.kubeconfig)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_install_rbac_and_uninstall(testbed: Testbed, release: dict[str, Any]) -> None:
    tb, ns = testbed, release["namespace"]
    docs = manifest(tb, release)
    assert len(docs) >= 25
    # Every object of the release was accepted and stored by the API server.
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        where = [] if kind in CLUSTER_KINDS else ["-n", ns]
        api_version = doc["apiVersion"]
        group = api_version.split("/")[0] if "/" in api_version else ""
        resource = f"{kind.lower()}.{group}" if group else kind.lower()
        got = get_json(tb, resource, name, *where)
        assert got["metadata"]["name"] == name
    pricebook = get_json(tb, "pricebooks.gpucloud.dev", release["name"])
    assert pricebook["spec"]["gpus"][0]["payAsYouGoPerHour"] == "19.80"

    # The agent DaemonSet lands on every GPU node and on no other node.
    gpu_nodes = get_json(tb, "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert gpu_nodes
    ds_name = f"{release['name']}-gpucloud-agent"
    wait_for(
        lambda: (
            get_json(tb, "daemonset", ds_name, "-n", ns)
            .get("status", {})
            .get("desiredNumberScheduled")
            == len(gpu_nodes)
        ),
        timeout=60,
        what="the agent DaemonSet scheduled on every GPU node",
    )
    wait_for(
        lambda: (
            len(get_json(tb, "pods", "-n", ns, "-l", "app.kubernetes.io/component=agent")["items"])
            == len(gpu_nodes)
        ),
        timeout=60,
        what="agent pods created",
    )
    pods = get_json(tb, "pods", "-n", ns, "-l", "app.kubernetes.io/component=agent")["items"]
    node_names = {n["metadata"]["name"] for n in gpu_nodes}
    assert {p["spec"].get("nodeName") for p in pods} == node_names
    assert {p["spec"]["priorityClassName"] for p in pods} == {"system-node-critical"}

    check_service_accounts(tb, release)
    check_tenant(tb, release)

    # Uninstall removes the release's cluster-scoped objects and leaves the CRDs.
    rel_name, tmp = release["name"], release["tmp"]
    proc = helm("uninstall", rel_name, "--namespace", ns, "--wait", "--timeout", "60s",
                tmp=tmp, kubeconfig=tb.kubeconfig, timeout=90)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for kind, name in [
        ("clusterroles", f"{rel_name}-gpucloud-agent"),
        ("clusterrolebindings", f"{rel_name}-gpucloud-operator"),
        ("pricebooks.gpucloud.dev", rel_name),
        ("clusterkopfpeerings.kopf.dev", f"{rel_name}-gpucloud"),
    ]:
        proc = tb.kubectl("get", kind, name, check=False)
        assert proc.returncode != 0 and "NotFound" in proc.stderr, (kind, name, proc.stdout)
    for crd in ("gpuinstances.gpucloud.dev", "clusterkopfpeerings.kopf.dev"):
        tb.kubectl("get", "crd", crd)
    # The ledger's claim outlives the release on purpose (helm.sh/resource-policy: keep).
    tb.kubectl("get", "pvc", f"{rel_name}-gpucloud-ledger", "-n", ns)


def sa(release: dict[str, Any], component: str) -> str:
    return f"system:serviceaccount:{release['namespace']}:{release['name']}-gpucloud-{component}"


def check_service_accounts(tb: Testbed, release: dict[str, Any]) -> None:
    ns, other = release["namespace"], release["other"]
    agent, api = sa(release, "agent"), sa(release, "api")
    operator, gateway = sa(release, "operator"), sa(release, "gateway")
    # (identity, verb, resource, namespace or None for cluster-wide, allowed?)
    table = [
        (agent, "list", "pods", None, True),
        (agent, "watch", "pods", other, True),
        (agent, "get", "secrets", ns, False),
        (agent, "list", "secrets", None, False),
        (agent, "create", "pods", other, False),
        (agent, "delete", "pods", other, False),
        (agent, "patch", "pods", other, False),
        (agent, "create", "tokenreviews.authentication.k8s.io", None, False),
        (agent, "get", "gpuinstances.gpucloud.dev", other, False),
        (agent, "get", "nodes", None, True),  # fake NVML only (agent.nvml=fake here)
        (agent, "patch", "nodes", None, False),
        (api, "create", "tokenreviews.authentication.k8s.io", None, True),
        # the console lists an account's instances and model deployments, writes none
        (api, "list", "gpuinstances.gpucloud.dev", None, True),
        (api, "watch", "modeldeployments.gpucloud.dev", other, True),
        (api, "create", "gpuinstances.gpucloud.dev", other, False),
        (api, "list", "clouddisks.gpucloud.dev", None, False),
        # who may use an account: the Account's namespaces and a SubjectAccessReview
        (api, "get", "accounts.gpucloud.dev", None, True),
        (api, "list", "accounts.gpucloud.dev", None, True),  # who owns a shared namespace
        (api, "patch", "accounts.gpucloud.dev", None, False),
        (api, "create", "subjectaccessreviews.authorization.k8s.io", None, True),
        (api, "patch", "gpuinstances.gpucloud.dev", other, False),
        (api, "get", "secrets", ns, False),
        (api, "create", "pods", other, False),
        (operator, "patch", "gpuinstances.gpucloud.dev/status", other, True),
        (operator, "patch", "accounts.gpucloud.dev/status", None, True),
        (operator, "create", "pods", other, True),
        (operator, "create", "persistentvolumes", None, True),
        (operator, "create", "persistentvolumeclaims", other, True),
        (operator, "create", "deployments.apps", other, True),
        (operator, "create", "events", other, True),
        (operator, "list", "nodes", None, True),
        (operator, "patch", "clusterkopfpeerings.kopf.dev", None, True),
        (operator, "get", "secrets", other, False),
        (operator, "create", "rechargereviews.gpucloud.dev", None, False),
        (operator, "create", "gpuinstances.gpucloud.dev", other, False),
        (operator, "delete", "namespaces", None, False),
        (operator, "patch", "nodes", None, False),
        (gateway, "list", "endpointslices.discovery.k8s.io", None, True),
        (gateway, "create", "tokenreviews.authentication.k8s.io", None, True),  # callers
        (gateway, "patch", "deployments.apps/scale", other, True),
        (gateway, "list", "modeldeployments.gpucloud.dev", None, True),
        (gateway, "patch", "modeldeployments.gpucloud.dev", other, False),
        (gateway, "patch", "deployments.apps", other, False),
        (gateway, "create", "pods", other, False),
        (gateway, "get", "secrets", other, False),
    ]
    wrong = []
    for who, verb, resource, where, allowed in table:
        res, _, sub = resource.partition("/")
        extra = ["--subresource", sub] if sub else []
        extra += ["-n", where] if where else ["--all-namespaces"]
        if can(tb, who, verb, res, *extra) != allowed:
            wrong.append((who.rsplit(":", 1)[1], verb, resource, where, allowed))
    assert not wrong, f"RBAC differs from the intended table: {wrong}"


def check_tenant(tb: Testbed, release: dict[str, Any]) -> None:
    ns, other, tenant = release["namespace"], release["other"], release["tenant"]
    # The tenant is bound to the built-in "edit" role in their namespace only.
    tb.kubectl("create", "rolebinding", "tenant-edit", "--clusterrole=edit", f"--user={tenant}",
               "-n", ns)  # fmt: skip
    # The aggregation controller folds gpucloud's rules into "edit" asynchronously.
    wait_for(
        lambda: can(tb, tenant, "create", "gpuinstances.gpucloud.dev", "-n", ns),
        timeout=30,
        what="gpucloud rules aggregated into the edit role",
    )
    allowed = [
        ("create", "gpuinstances.gpucloud.dev", ns),
        ("delete", "gpuinstances.gpucloud.dev", ns),
        ("create", "modeldeployments.gpucloud.dev", ns),
        ("create", "recharges.gpucloud.dev", ns),
        ("list", "recharges.gpucloud.dev", ns),
        ("get", "pricebooks.gpucloud.dev", None),
    ]
    denied = [
        ("create", "rechargereviews.gpucloud.dev", None),
        ("create", "rechargereviews.gpucloud.dev", ns),
        ("patch", "gpuinstances.gpucloud.dev/status", ns),
        ("update", "recharges.gpucloud.dev/status", ns),
        ("create", "gpuinstances.gpucloud.dev", other),
        ("get", "gpuinstances.gpucloud.dev", other),
        ("create", "accounts.gpucloud.dev", None),
        ("patch", "pricebooks.gpucloud.dev", None),
    ]
    for verb, resource, where in allowed + denied:
        res, _, sub = resource.partition("/")
        extra = (["--subresource", sub] if sub else []) + (["-n", where] if where else [])
        expected = (verb, resource, where) in allowed
        assert can(tb, tenant, verb, res, *extra) == expected, (verb, resource, where, expected)
    # Their own Account by name (accountReaders), no other account.
    assert can(tb, tenant, "get", f"accounts.gpucloud.dev/{release['account']}")
    assert not can(tb, tenant, "get", "accounts.gpucloud.dev/someone-else")
    # The billing admin, and only they, review bank transfers.
    assert can(tb, release["admin"], "create", "rechargereviews.gpucloud.dev")
    assert can(tb, release["admin"], "patch", "accounts.gpucloud.dev")
    assert not can(tb, release["admin"], "patch", "gpuinstances.gpucloud.dev/status", "-n", ns)

    # For real, not only can-i: the tenant creates an instance and cannot write its status.
    gi = yaml.safe_load((REPO / "examples" / "gpuinstance-payg.yaml").read_text())
    gi["metadata"]["namespace"] = ns
    tb.kubectl("create", "-f", "-", "--as", tenant, input=yaml.safe_dump(gi))
    name = gi["metadata"]["name"]
    proc = tb.kubectl(
        "patch", "gpuinstances.gpucloud.dev", name, "-n", ns, "--as", tenant,
        "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Running"}}',
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    tb.kubectl(
        "delete", "gpuinstances.gpucloud.dev", name, "-n", ns, "--as", tenant, "--wait=false"
    )
    gi["metadata"]["namespace"] = other
    proc = tb.kubectl("create", "-f", "-", "--as", tenant, input=yaml.safe_dump(gi), check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
