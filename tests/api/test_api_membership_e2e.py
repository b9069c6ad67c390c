"""Who may use an account, decided by the real API server of the kwok test bed (e2e).

The Account lists its namespaces; a caller may read and recharge it when RBAC lets them
create Recharges in one of them (SubjectAccessReview). Real ServiceAccount tokens,
real RoleBindings, real TokenReview and SubjectAccessReview: no list of ours.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import yaml
from apihelpers import auth

from gpucloud.api.testserver import ApiProcess
from gpucloud.ledger import open_ledger
from gpucloud.testing import testbed as testbed_mod
from gpucloud.testing.kube import delete_namespace, wait_for

pytestmark = pytest.mark.e2e


def _role(name: str, ns: str, verbs: list[str]) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": ns},
        "rules": [{"apiGroups": ["gpucloud.dev"], "resources": ["recharges"], "verbs": verbs}],
    }


def _binding(name: str, ns: str, role: str, sa_ns: str, sa: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}],
    }


@pytest.fixture
def tenancy(testbed: testbed_mod.Testbed) -> Iterator[dict[str, str]]:
    """Two namespaces of account ``acct``, one of another account, and four callers."""
    tag = uuid.uuid4().hex[:5]
    research, prod, other = f"m-research-{tag}", f"m-prod-{tag}", f"m-other-{tag}"
    account, other_account = f"acme-{tag}", f"globex-{tag}"
    docs: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
        for n in (research, prod, other)
    ]
    docs += [
        {
            "apiVersion": "gpucloud.dev/v1alpha1",
            "kind": "Account",
            "metadata": {"name": name},
            "spec": {"namespaces": nss, "currency": "CNY"},
        }
        for name, nss in ((account, [research, prod]), (other_account, [other]))
    ]
    for ns, sa in ((prod, "payer"), (research, "viewer"), (other, "neighbour")):
        meta = {"name": sa, "namespace": ns}
        docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
    docs += [
        _role("pay", prod, ["create", "get"]),
        _role("look", research, ["get", "list"]),
        _role("pay", other, ["create"]),
        _binding("payer-pays", prod, "pay", prod, "payer"),
        _binding("viewer-looks", research, "look", research, "viewer"),
        _binding("neighbour-pays", other, "pay", other, "neighbour"),
    ]
    testbed.apply(yaml.safe_dump_all(docs))
    tokens = {
        sa: testbed.kubectl("create", "token", sa, "-n", ns).stdout.strip()
        for ns, sa in ((prod, "payer"), (research, "viewer"), (other, "neighbour"))
    }
    yield {
        "account": account, "other_account": other_account, "prod": prod,
        "research": research, **tokens,
    }  # fmt: skip
    testbed.kubectl("delete", "account", account, other_account, "--wait=false", check=False)
    for ns in (research, prod, other):
        delete_namespace(testbed, ns)


def test_account_members_come_from_the_account_and_rbac(
    testbed: testbed_mod.Testbed,
    tenancy: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    account = tenancy["account"]
    workdir = tmp_path_factory.mktemp("membership")
    api = ApiProcess(
        workdir,
        static_tokens=False,
        extra_args=["--kubeconfig", str(testbed.kubeconfig), "--membership-cache-s", "0"],
    )
    ledger = open_ledger(api.database_url)
    ledger.ensure_account(account, "CNY")
    ledger.ensure_account(tenancy["other_account"], "CNY")
    ledger.close()
    with api, httpx.Client(base_url=api.url, timeout=30) as c:

        def balance(token: str, name: str = account) -> int:
            return c.get(f"/v1/accounts/{name}/balance", headers=auth(token)).status_code

        # may create Recharges in prod, which the Account lists: a member
        assert balance(tenancy["payer"]) == 200
        # may only read Recharges in research: not a member, and told why
        refused = c.get(f"/v1/accounts/{account}/balance", headers=auth(tenancy["viewer"]))
        assert refused.status_code == 403 and "Recharges" in refused.json()["detail"]
        # may pay in its own namespace, which belongs to another account
        assert balance(tenancy["neighbour"]) == 403
        assert balance(tenancy["neighbour"], tenancy["other_account"]) == 200
        assert balance(tenancy["payer"], tenancy["other_account"]) == 403
        # an account with no Account resource: nobody but admins
        assert balance(tenancy["payer"], "no-such-account") == 403
        # a later Account listing prod too does not make prod's payer its member: prod
        # bills to the Account that claimed it first (the operator's rule)
        late = f"{account}-late"
        testbed.apply(yaml.safe_dump({
            "apiVersion": "gpucloud.dev/v1alpha1", "kind": "Account", "metadata": {"name": late},
            "spec": {"namespaces": [tenancy["prod"]], "currency": "CNY"},
        }))  # fmt: skip
        try:
            assert balance(tenancy["payer"], late) == 403
            assert balance(tenancy["payer"]) == 200
        finally:
            testbed.kubectl("delete", "account", late, "--wait=false")

        # the Account stops listing prod: payer is out, without restarting anything
        testbed.kubectl(
            "patch", "account", account, "--type=merge",
            "-p", yaml.safe_dump({"spec": {"namespaces": [tenancy["research"]]}}),
        )  # fmt: skip
        wait_for(lambda: balance(tenancy["payer"]) == 403, timeout=20, what="payer refused")
        # and the RoleBinding is what counts: research gets a payer's binding for viewer
        testbed.apply(
            yaml.safe_dump_all(
                [
                    _role("pay", tenancy["research"], ["create"]),
                    _binding(
                        "viewer-pays", tenancy["research"], "pay", tenancy["research"], "viewer"
                    ),
                ]
            )
        )
        wait_for(lambda: balance(tenancy["viewer"]) == 200, timeout=20, what="viewer admitted")
