"""Least privilege for real: the chart is installed into the test bed with the real helm,
then the operator, the metering API and a node agent run as local processes on tokens
of the ServiceAccounts the chart created (TokenRequest, one kubeconfig per identity: the
test bed's API server, its CA and the bearer token, nothing else) and do their jobs.
Denials are shown with the same real tokens, never with --as.

What RBAC cannot do (docs/install.md): the agent lists pods cluster-wide with a
``spec.nodeName`` field selector, but RBAC has no rule per node, so its token may read
every node's pods (names, UIDs, specs; never secrets). Node scoping of what the agent
may *report* is enforced by the metering API instead: its token is bound to its pod,
TokenReview answers with that pod's node, and the API refuses usage for other nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from charttools import Identity, install, mint_token, uninstall

from gpucloud.api.testserver import ApiProcess
from gpucloud.billing import from_minor
from gpucloud.ledger import open_ledger
from gpucloud.testing import prometheus
from gpucloud.testing.kube import delete_namespace, get_json, wait_for
from gpucloud.testing.net import free_port
from gpucloud.testing.prometheus import Prometheus
from gpucloud.testing.testbed import REPO, Testbed

sys.path.insert(0, str(REPO / "tests" / "e2e" / "operator"))
from opharness import Harness

pytestmark = pytest.mark.e2e
L40S = "NVIDIA-L40S"
AUDIENCE = "gpucloud-api"  # the chart's api.tokenAudience


@dataclass
class Bed:
    tb: Testbed
    release: str
    ns: str  # the release's namespace (gpucloud-system in production)
    tenant_ns: str
    other_ns: str
    tmp: Path
    ids: dict[str, Identity]
    op: Harness
    metrics_port: int
    instance: dict[str, Any] = field(default_factory=dict)

    def sa(self, component: str) -> str:
        return f"{self.release}-gpucloud-{component}"

    def operator_log_clean(self) -> None:
        log = self.op.log.read_text(errors="replace")
        assert "Forbidden" not in log and "403" not in log, log[-3000:]


@pytest.fixture(scope="module")
def bed(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tb, tmp = testbed, tmp_path_factory.mktemp("identities")
    rel = f"id{uuid.uuid4().hex[:6]}"
    ns, tenant_ns, other_ns = f"{rel}-system", f"{rel}-tenant", f"{rel}-other"
    for name in (ns, tenant_ns, other_ns):
        tb.kubectl("create", "namespace", name)
    billing = f"system:serviceaccount:{ns}:billing"
    tenant = f"system:serviceaccount:{tenant_ns}:tenant"
    readers = [{"account": tenant_ns, "users": [tenant]}]
    op: Harness | None = None
    try:
        install(
            tb, rel, ns, tmp,
            "--set", f"pricebook.name={rel}",
            "--set", "agent.nvml=fake",
            "--set-json", f'rbac.billingAdmins.users=["{billing}"]',
            "--set-json", f"rbac.accountReaders={json.dumps(readers)}",
        )  # fmt: skip
        # People: a tenant bound to the built-in "edit" in their namespace, a billing admin.
        tb.kubectl("create", "serviceaccount", "tenant", "-n", tenant_ns)
        tb.kubectl("create", "serviceaccount", "billing", "-n", ns)
        tb.kubectl("create", "rolebinding", "tenant-edit", "--clusterrole=edit",
                   f"--serviceaccount={tenant_ns}:tenant", "-n", tenant_ns)  # fmt: skip
        ids = {
            c: Identity(tb, c, mint_token(tb, f"{rel}-gpucloud-{c}", ns), tmp)
            for c in ("operator", "api")
        }
        ids["tenant"] = Identity(tb, "tenant", mint_token(tb, "tenant", tenant_ns), tmp)
        ids["billing"] = Identity(tb, "billing", mint_token(tb, "billing", ns), tmp)
        # The aggregation controller folds gpucloud's rules into "edit" asynchronously.
        wait_for(
            lambda: ids["tenant"].kubectl(
                "auth", "can-i", "create", "gpuinstances.gpucloud.dev", "-n", tenant_ns
            ).stdout.strip() == "yes",
            timeout=30, what="gpucloud's rules aggregated into edit",
        )  # fmt: skip

        # The operator as a local process on its ServiceAccount's token, peering through
        # the chart's ClusterKopfPeering, pricing with the chart's PriceBook.
        port = free_port()
        (tmp / "operator").mkdir()
        op = Harness(tb, tenant_ns, tmp / "operator", pricebook=rel, metrics_port=port)
        op.kubeconfig = ids["operator"].kubeconfig
        op.mode_args = [f"--peering={rel}-gpucloud"]
        op.setup()
        op.fund(100_00)
        op.start()
        yield Bed(tb, rel, ns, tenant_ns, other_ns, tmp, ids, op, port)
    finally:
        if op is not None:
            op.close()
        for name in (tenant_ns, other_ns):
            delete_namespace(tb, name)
        uninstall(tb, rel, ns, tmp)
        delete_namespace(tb, ns)


@pytest.fixture(scope="module")
def instance(bed: Bed) -> dict[str, Any]:
    """A GPUInstance the tenant created with their own token, Running under the operator."""
    doc = {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": "nb", "namespace": bed.tenant_ns},
        "spec": {
            "gpu": {"product": L40S, "count": 1},
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": 50},
            "state": "Running",
        },
    }
    bed.ids["tenant"].ok("create", "-f", "-", input=yaml.safe_dump(doc))
    try:
        status = bed.op.wait_phase("nb", "Running", timeout=120)
    except AssertionError as exc:  # a missing permission shows in the operator's log
        raise AssertionError(f"{exc}\noperator log:\n{bed.op.log.read_text()[-4000:]}") from None
    pod = bed.op.pod("nb")
    assert pod is not None and pod["spec"]["nodeName"] == status["node"]
    return {"status": status, "pod": pod, "node": status["node"]}


def test_operator_reconciles_on_its_own_token(bed: Bed, instance: dict[str, Any]) -> None:
    tb, h, tenant_ns = bed.tb, bed.op, bed.tenant_ns
    # Pod, claim and its local PV created by the operator; status and events written.
    pvc = get_json(tb, "pvc", "nb-data", "-n", tenant_ns)
    assert pvc["status"]["phase"] == "Bound"
    get_json(tb, "pv", pvc["spec"]["volumeName"])
    assert instance["status"]["gpuSummary"] == "NVIDIA-L40S x1"
    assert h.events("nb"), "no events posted for the instance"
    # The Account's status, patched from the ledger.
    wait_for(
        lambda: get_json(tb, "account", h.account).get("status", {}).get("balance") == "100.00",
        timeout=30, what="the Account's balance in its status",
    )  # fmt: skip
    # Peering: the operator holds the chart's ClusterKopfPeering (patched with its token).
    peering = get_json(tb, "clusterkopfpeering", f"{bed.release}-gpucloud")
    assert peering.get("status"), "the operator did not announce itself in the peering"

    # A bank-transfer recharge: the tenant files it, cannot approve it; the billing admin can.
    recharge = yaml.safe_load((REPO / "examples" / "recharge-bank-transfer.yaml").read_text())
    recharge["metadata"] = {
        "name": "transfer",
        "namespace": tenant_ns,
        # the chart's admission policy: the submitter is the user creating it
        "annotations": {"gpucloud.dev/submitter": bed.ids["tenant"].username},
    }
    recharge["spec"] |= {"account": h.account, "amount": "50.00"}
    bed.ids["tenant"].ok("create", "-f", "-", input=yaml.safe_dump(recharge))

    def recharge_phase() -> str | None:
        got = get_json(tb, "recharge", "transfer", "-n", tenant_ns)
        return (got.get("status") or {}).get("phase")

    h.wait(lambda: recharge_phase() == "AwaitingReview", "the recharge to await review")
    seen = get_json(tb, "recharge", "transfer", "-n", tenant_ns)
    review = {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "RechargeReview",
        "metadata": {
            "name": f"{tenant_ns}.transfer",
            "annotations": {"gpucloud.dev/reviewer": bed.ids["billing"].username},
        },
        "spec": {  # exactly what the admin looked at
            "rechargeRef": {
                "namespace": tenant_ns, "name": "transfer", "uid": seen["metadata"]["uid"]
            },
            "amount": seen["spec"]["amount"],
            "voucherId": seen["status"]["orderId"],
            "decision": "Approve",
            "reason": "matched on the bank statement",
        },
    }  # fmt: skip
    bed.ids["tenant"].forbidden("create", "-f", "-", input=yaml.safe_dump(review))
    bed.ids["operator"].forbidden("create", "-f", "-", input=yaml.safe_dump(review))
    # The billing admin cannot name someone else as the reviewer (admission policy).
    forged = {**review, "metadata": {**review["metadata"], "annotations": {
        "gpucloud.dev/reviewer": "someone-else"}}}  # fmt: skip
    proc = bed.ids["billing"].kubectl("create", "-f", "-", input=yaml.safe_dump(forged))
    assert proc.returncode != 0 and "gpucloud.dev/reviewer" in proc.stderr, proc.stderr
    bed.ids["billing"].ok("create", "-f", "-", input=yaml.safe_dump(review))
    h.wait(lambda: recharge_phase() == "Credited", "the approved recharge to be credited")
    assert h.ledger.balance(h.account) == 150_00
    review_status = get_json(tb, "rechargereview", f"{tenant_ns}.transfer")["status"]
    assert review_status["applied"] is True
    wait_for(
        lambda: get_json(tb, "account", h.account).get("status", {}).get("balance") == "150.00",
        timeout=30, what="the credited balance in the Account's status",
    )  # fmt: skip
    bed.operator_log_clean()


def test_tenant_token_is_confined(bed: Bed, instance: dict[str, Any]) -> None:
    tenant, ns, other = bed.ids["tenant"], bed.tenant_ns, bed.other_ns
    tenant.ok("get", "gpuinstances.gpucloud.dev", "nb", "-n", ns)
    tenant.ok("get", "accounts.gpucloud.dev", ns)  # their own Account (rbac.accountReaders)
    tenant.ok("get", "pricebooks.gpucloud.dev", bed.release)
    status_patch = ["--subresource=status", "--type=merge", "-p"]
    tenant.forbidden("patch", "gpuinstances.gpucloud.dev", "nb", "-n", ns, *status_patch,
                     '{"status": {"phase": "Stopped"}}')  # fmt: skip
    tenant.forbidden("patch", "accounts.gpucloud.dev", ns, "--type=merge", "-p",
                     '{"spec": {"instanceLimit": 99}}')  # fmt: skip
    tenant.forbidden("patch", "accounts.gpucloud.dev", ns, *status_patch,
                     '{"status": {"balance": "1000000.00"}}')  # fmt: skip
    tenant.forbidden("get", "accounts.gpucloud.dev", other)
    tenant.forbidden("get", "gpuinstances.gpucloud.dev", "-n", other)
    doc = {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": "intruder", "namespace": other},
        "spec": {"gpu": {"product": L40S, "count": 1}, "billing": {"mode": "PayAsYouGo"}},
    }
    tenant.forbidden("create", "-f", "-", input=yaml.safe_dump(doc))
    tenant.forbidden("get", "rechargereviews.gpucloud.dev")
    tenant.forbidden("patch", "pricebooks.gpucloud.dev", bed.release, "--type=merge", "-p",
                     '{"spec": {"currency": "CNY"}}')  # fmt: skip


def spawn_agent(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpucloud_agent.main", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_api_and_agent_on_their_own_tokens(bed: Bed, instance: dict[str, Any]) -> None:
    tb, tmp, node = bed.tb, bed.tmp, instance["node"]
    agent_user = f"system:serviceaccount:{bed.ns}:{bed.sa('agent')}"
    # The release's agent pod on the instance's node: its tokens are bound to it, as the
    # kubelet's projected tokens are, so the API server knows the node they speak for.
    pods = get_json(tb, "pods", "-n", bed.ns, "-l", "app.kubernetes.io/component=agent",
                    "--field-selector", f"spec.nodeName={node}")["items"]  # fmt: skip
    assert len(pods) == 1, pods
    agent_pod = pods[0]["metadata"]["name"]
    agent = Identity(tb, "agent", mint_token(tb, bed.sa("agent"), bed.ns, bound_pod=agent_pod), tmp)
    agent_api_token = mint_token(
        tb, bed.sa("agent"), bed.ns, audience=AUDIENCE, bound_pod=agent_pod
    )
    assert agent.username == agent_user

    # The metering API on its own token: TokenReview is all it asks of Kubernetes.
    api = ApiProcess(
        tmp / "api",
        static_tokens=False,
        extra_args=[
            "--kubeconfig", str(bed.ids["api"].kubeconfig),
            "--token-audiences", AUDIENCE,
            "--agent-sa", agent_user,
        ],
    ).start()  # fmt: skip
    socket = tmp / "pod-resources.sock"
    procs: list[subprocess.Popen[bytes]] = []
    try:

        def post(token: str, records: list[dict[str, Any]]) -> httpx.Response:
            return httpx.post(
                f"{api.url}/v1/usage",
                json={"records": records},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )

        assert post(agent_api_token, []).status_code == 200
        foreign = {
            "kind": "gpu_time", "node": "some-other-node", "start": 1, "end": 2, "quantity": 1,
            "gpu": {"uuid": "GPU-0", "product": L40S},
            "pod": {"namespace": bed.tenant_ns, "name": "nb-gpu", "uid": "x"},
        }  # fmt: skip
        refused = post(agent_api_token, [foreign])  # refused on its own, naming the node
        assert refused.status_code == 422 and node in refused.text, refused.text
        assert refused.json()["errors"][0]["rule"] == "wrong_node"
        # The tenant's token for the right audience: authenticated, not an agent.
        tenant_api = mint_token(tb, "tenant", bed.tenant_ns, audience=AUDIENCE)
        assert post(tenant_api, []).status_code == 403
        # A token for another audience (the API server's) does not pass TokenReview.
        assert post(agent.token, []).status_code == 401

        # The kubelet's pod-resources stand-in (the test bed's admin: it plays the kubelet),
        # then the agent on its own tokens: pod UIDs and the Node from Kubernetes, usage to
        # the API.
        procs.append(
            spawn_agent(
                ["serve-podresources", "--node-name", node, "--socket", str(socket),
                 "--kubeconfig", str(tb.kubeconfig)],
                tmp / "podresources.log",
            )
        )  # fmt: skip
        token_file = tmp / "agent-token"
        token_file.write_text(agent_api_token)
        procs.append(
            spawn_agent(
                [
                    "run", "--node-name", node, "--nvml", "fake", "--fake-from-kube",
                    "--kubeconfig", str(agent.kubeconfig), "--pod-uid-source", "kube",
                    "--pod-resources-socket", str(socket), "--api-url", api.url,
                    "--token-file", str(token_file), "--wal-dir", str(tmp / "wal"),
                    "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
                    "--sample-period", "1",
                ],
                tmp / "agent.log",
            )
        )  # fmt: skip
        ledger = open_ledger(api.database_url)
        try:

            def shipped() -> list[Any]:
                if procs[-1].poll() is not None:
                    raise AssertionError((tmp / "agent.log").read_text()[-3000:])
                return [
                    u
                    for u in ledger.unrated_usage(limit=100_000)
                    if u.namespace == bed.tenant_ns and u.kind == "gpu_time"
                ]

            wait_for(lambda: len(shipped()) >= 2, timeout=90, what="usage in the ledger")
            usage = shipped()
            assert {u.owner for u in usage} == {instance["pod"]["metadata"]["uid"]}
            assert {u.node for u in usage} == {node}
        finally:
            ledger.close()
        log = (tmp / "agent.log").read_text(errors="replace")
        assert "Forbidden" not in log and " 403" not in log, log[-3000:]
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        api.stop()

    # What the agent's token may not do.
    ns, other = bed.ns, bed.tenant_ns
    for args in (
        ("get", "secrets", "-n", ns),
        ("get", "secrets", "-A"),
        ("delete", "pod", "nb-gpu", "-n", other, "--wait=false"),
        ("label", "pod", "nb-gpu", "-n", other, "x=y"),
        ("label", "node", node, "x=y"),
        ("get", "nodes"),  # its own Node by name only (fake NVML), no list
        ("get", "gpuinstances.gpucloud.dev", "-n", other),
        ("get", "configmaps", "-n", ns),
    ):
        agent.forbidden(*args)
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": agent_api_token}}  # fmt: skip
    agent.forbidden("create", "-f", "-", input=json.dumps(review))
    # Honest limit: RBAC has no per-node rule, so the field selector the agent uses is a
    # filter, not a boundary; the agent's token can read other nodes' pods.
    elsewhere = agent.ok("get", "pods", "-A", "--field-selector", f"spec.nodeName!={node}",
                         "-o", "name")  # fmt: skip
    assert elsewhere.strip(), "expected pods on other nodes (the release's agents)"

    # What the API's token may not do: it reads Accounts, and GPUInstances and
    # ModelDeployments for the console (read only), nothing else.
    bed.ids["api"].ok("get", "gpuinstances.gpucloud.dev", "-A")
    for args in (
        ("get", "secrets", "-n", ns),
        ("get", "pods", "-n", other),
        ("delete", "gpuinstances.gpucloud.dev", "nb", "-n", other, "--wait=false"),
        ("patch", "gpuinstances.gpucloud.dev", "nb", "-n", other, "--type=merge", "-p",
         '{"spec": {"state": "Stopped"}}'),
    ):  # fmt: skip
        bed.ids["api"].forbidden(*args)

    # What the operator's token may not do.
    operator = bed.ids["operator"]
    for args in (
        ("get", "secrets", "-n", other),
        ("delete", "namespace", bed.other_ns, "--wait=false"),
        ("label", "node", node, "x=y"),
        ("get", "configmaps", "-n", ns),
    ):
        operator.forbidden(*args)
    bed.operator_log_clean()


@pytest.mark.skipif(
    prometheus.BINARY is None, reason="prometheus is not installed (make system-deps)"
)
def test_prometheus_scrapes_the_operator(bed: Bed, instance: dict[str, Any]) -> None:
    """A real Prometheus scrapes the operator (on its SA token); the balance it reports is
    the ledger's, and the cost per hour is the running instance's price plus storage."""
    account = bed.op.account
    with Prometheus(bed.tmp / "prometheus", {"operator": f"127.0.0.1:{bed.metrics_port}"}) as prom:
        value, query = prom.value, prom.query
        ledger_balance = float(from_minor(bed.op.ledger.balance(account), "CNY"))
        q = f'gpucloud_account_balance{{account="{account}", currency="CNY"}}'
        wait_for(lambda: value(q) == ledger_balance, timeout=60,
                 what=f"Prometheus to report the ledger's balance {ledger_balance}")  # fmt: skip
        # L40S 5.20/h + 50 GiB of instance storage at 0.0004 per GiB-hour.
        cost = f'gpucloud_account_cost_per_hour{{account="{account}"}}'
        assert value(cost) == pytest.approx(5.22)
        assert value(f'gpucloud_account_in_arrears{{account="{account}"}}') == 0
        available = value(f'gpucloud_account_available_balance{{account="{account}"}}')
        assert available is not None and available <= ledger_balance
        assert not query(f'gpucloud_account_data_deletion_timestamp_seconds{{account="{account}"}}')
        running = value('gpucloud_operator_instances{phase="Running"}')
        assert running is not None and running >= 1
        assert value('up{job="operator"}') == 1
