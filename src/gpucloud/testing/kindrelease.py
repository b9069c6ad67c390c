"""gpucloud as users run it on the kind tier: our chart installed from our images, and a
tenant's view of it (custom resources through kubectl, money read back from the ledger
the API pod uses, payments sent as the payment provider would). Shared by tests/kind and
``make demo-kind``.

    release = install_release(cluster, workdir)         # helm upgrade --install, --wait
    tenant = KindHarness(cluster, "acme-research", RELEASE_NAMESPACE)
    tenant.setup(); tenant.pay_online("topup", "100.00"); tenant.instance(...)
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from gpucloud.billing import to_minor
from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kube import wait_for
from gpucloud.testing.testbed import REPO

CHART = REPO / "charts" / "gpucloud"
RELEASE_NAMESPACE = "gpucloud-system"
API = "deploy/gpucloud-api"  # the release is named gpucloud
API_URL = f"http://gpucloud-api.{RELEASE_NAMESPACE}.svc:8080"
API_AUDIENCE = "gpucloud-api"  # the chart's api.tokenAudience: the API takes no other
GATEWAY_URL = f"http://gpucloud-gateway.{RELEASE_NAMESPACE}.svc:80"  # the tenants' Service
GATEWAY_STATS = f"http://gpucloud-gateway-ops.{RELEASE_NAMESPACE}.svc:9091/v1/stats"
SANDBOX_SECRET = "kind-sandbox-secret"
# The chart on the kind tier: the agents' fake NVML reads the fake device plugin's device
# list on each node; prices that do not divide evenly; checks every second or two, so
# that the flows run in seconds; the sandbox payment provider on.
KIND_VALUES = {
    "agent": {"nvml": "fake", "fakeDevicesFile": "/run/gpucloud-fake-gpu/devices.json"},
    "api": {"sandboxPayments": {"existingSecret": "gpucloud-sandbox"}},
    # hack/kind/cluster.yaml binds one host folder into every node at the disks root
    "cloudDisks": {"storage": "hostPath", "meter": {"metricsIntervalSeconds": 5}},
    "operator": {
        "config": {
            "tick_interval_s": 1,
            "sweep_max_interval_s": 5,  # a PriceBook or Account edit seen within seconds
            "account_interval_s": 2,
            "recharge_interval_s": 1,
            "cost_refresh_s": 5,
            "metering_grace_s": 30,
            "preemption_grace_s": 20,
            "model_interval_s": 1,
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
        "models": {
            "per1KTokens": "0.0137",
            "perImage": "0.0813",
            "perVideo": "1.2100",
            "personalPerRequestSecond": "0.0031",
        },
        "storage": {
            "instancePerGBHour": "0.0005",
            "cloudDiskPerGBHour": "0.0613",
            "imagePerGBHour": "0.0002",
        },
    },
}


def helm(kind: KindCluster, *args: str, timeout: float = 600) -> str:
    """Our helm (built from its Go module) on the kind cluster; fails with its output."""
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
    # Helm installs CRDs only on a first install: after a CRD change the admin applies
    # them (docs/install.md, "Upgrade"); so do we, before every install or upgrade
    kind.kubectl(
        "apply", "--server-side", "--force-conflicts", "-R", "-f", str(CHART / "crds"),
        timeout=120,
    )  # fmt: skip
    kind.apply(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}},
         {"apiVersion": "v1", "kind": "Secret",
          "metadata": {"name": "gpucloud-sandbox", "namespace": RELEASE_NAMESPACE},
          "stringData": {"secret": SANDBOX_SECRET}}]
    )  # fmt: skip
    path = tmp / f"{release}-values.yaml"
    path.write_text(yaml.safe_dump(merged))
    unstick_release(kind, release)
    helm(
        kind, "upgrade", "--install", release, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "-f", str(path), "--wait", "--timeout", "5m",
    )  # fmt: skip


def unstick_release(kind: KindCluster, release: str) -> None:
    """A helm killed mid-install (a test run cut short) leaves the release pending, and
    every later upgrade fails with "another operation is in progress": roll back to the
    last deployed revision, or uninstall a first install that never finished."""
    proc = subprocess.run(
        [str(kind.bin.helm), "--kubeconfig", str(kind.kubeconfig), "status", release,
         "--namespace", RELEASE_NAMESPACE, "-o", "json"],
        env=kind.env(), text=True, capture_output=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        return  # not installed
    status = json.loads(proc.stdout)["info"]["status"]
    if not status.startswith("pending"):
        return
    history = json.loads(
        helm(kind, "history", release, "--namespace", RELEASE_NAMESPACE, "-o", "json")
    )
    deployed = [h["revision"] for h in history if h["status"] in ("deployed", "superseded")]
    if deployed:
        helm(kind, "rollback", release, str(max(deployed)), "--namespace", RELEASE_NAMESPACE,
             "--wait", "--timeout", "5m")  # fmt: skip
    else:
        helm(kind, "uninstall", release, "--namespace", RELEASE_NAMESPACE, "--wait")


def ledger_sql(
    kind: KindCluster, query: str, *params: object, namespace: str = RELEASE_NAMESPACE
) -> list[list]:
    """Rows of a query on the ledger (``?`` placeholders), run inside the API's pod with
    the API's own database URL: what the API really stored, on SQLite or PostgreSQL."""
    script = (
        "import json, os, sys\n"
        "from sqlalchemy import create_engine, text\n"
        "params = {f'p{i}': v for i, v in enumerate(json.loads(sys.argv[2]))}\n"
        "with create_engine(os.environ['GPUCLOUD_DATABASE_URL']).connect() as c:\n"
        "    rows = c.execute(text(sys.argv[1]), params).fetchall()\n"
        "print(json.dumps([list(r) for r in rows], default=str))\n"
    )
    counter = iter(range(len(params)))
    named = re.sub(r"\?", lambda _: f":p{next(counter)}", query)
    out = kind.kubectl(
        "exec", "-n", namespace, API, "--",
        "python3", "-c", script, named, json.dumps(list(params)),
    ).stdout  # fmt: skip
    return json.loads(out)


# The kind release's prices (tests/kind/conftest.py): none divides evenly.
PRICES = {
    g["product"]: {"payg": Decimal(g["payAsYouGoPerHour"]), "spot": Decimal(g["spotPerHour"])}
    for g in KIND_VALUES["pricebook"]["gpus"]
}
STORAGE_PER_GIB_HOUR = Decimal(KIND_VALUES["pricebook"]["storage"]["instancePerGBHour"])
DISK_PER_GIB_HOUR = Decimal(KIND_VALUES["pricebook"]["storage"]["cloudDiskPerGBHour"])


class KindHarness:
    def __init__(
        self, kind: KindCluster, namespace: str, release_ns: str, account: str = ""
    ) -> None:
        self.kind, self.ns, self.release_ns = kind, namespace, release_ns
        # tests: one Account per test, named after its namespace
        self.account = account or namespace

    # -- the tenant's objects -------------------------------------------------------
    @property
    def user(self) -> str:
        """The tenant's Kubernetes user: everything of theirs is created as them
        (``kubectl --as``), with the RBAC the chart gives ``edit`` in their namespace."""
        return f"tenant@{self.ns}"

    def tenant_kubectl(self, *args: str, input: str | None = None) -> str:
        return self.kind.kubectl(f"--as={self.user}", *args, input=input).stdout

    def setup(self, instance_limit: int = 5) -> None:
        """The admin's part: the Account, and the tenant bound to ``edit`` in the
        namespace (docs/install.md, "First tenant")."""
        self.kind.apply(
            [
                {
                    "apiVersion": "gpucloud.dev/v1alpha1",
                    "kind": "Account",
                    "metadata": {"name": self.account},
                    "spec": {"namespaces": [self.ns], "instanceLimit": instance_limit},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "tenant-edit", "namespace": self.ns},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                "kind": "ClusterRole", "name": "edit"},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                  "name": self.user},
                                 {"kind": "ServiceAccount", "name": "tenant",
                                  "namespace": self.ns}],
                },
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "tenant", "namespace": self.ns}},
            ]
        )  # fmt: skip

    def token(
        self, service_account: str = "tenant", namespace: str = "", audience: str = ""
    ) -> str:
        """A real token of a ServiceAccount (the tenant's own by default), as a script
        or CI job of theirs would mint it: for the API, with its audience
        (``API_AUDIENCE``); for the gateway, the API server's default."""
        ns = namespace or self.ns
        args = ["create", "token", service_account, "-n", ns]
        if audience:
            args += ["--audience", audience]
        return self.kind.kubectl(*args).stdout.strip()

    def call(
        self, url: str, token: str, body: Any = None, timeout_s: float = 60
    ) -> tuple[int, Any]:
        """An HTTP call from inside the cluster (the API's pod, which has Python) with
        ``token``: GET, or POST of ``body`` as JSON. (status, decoded JSON body)."""
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            "data = None if sys.argv[3] == 'null' else sys.argv[3].encode()\n"
            "req = urllib.request.Request(sys.argv[1], data=data,"
            " headers={'Authorization': 'Bearer ' + sys.argv[2],"
            " 'Content-Type': 'application/json'})\n"
            "try:\n    r = urllib.request.urlopen(req, timeout=float(sys.argv[4]));"
            " code = r.status\n"
            "except urllib.error.HTTPError as e:\n    r = e; code = e.code\n"
            "print(json.dumps([code, json.loads(r.read() or b'null')]))\n"
        )
        out = self.kind.kubectl(
            "exec", "-n", self.release_ns, API, "--", "python3", "-c", script,
            url, token, json.dumps(body), str(timeout_s), timeout=timeout_s + 30,
        ).stdout  # fmt: skip
        code, answer = json.loads(out)
        return code, answer

    def api_get(self, path: str, token: str) -> tuple[int, Any]:
        """GET on the API's Service with ``token``: TokenReview and the account check run
        as the chart's API ServiceAccount, on the real RBAC."""
        return self.call(API_URL + path, token)

    def gateway_serves(self, model: str) -> bool:
        """The gateway has listed the model (its catalog polls every 2 s): what the
        operator's autoscaler reads on the ops Service names it."""
        code, stats = self.call(GATEWAY_STATS, "")
        return code == 200 and f"{self.ns}/{model}" in stats

    def model_request(
        self,
        model: str,
        token: str,
        max_tokens: int = 7,
        timeout_s: float = 150,
        latency_ms: int = 0,
    ) -> tuple[int, Any]:
        """A chat completion through the gateway's Service, as a tenant's client sends it
        (waits while a cold model wakes); ``latency_ms``: the fake model works that long."""
        body = {"messages": [{"role": "user", "content": "one two three"}],
                "max_tokens": max_tokens, "fake_latency_ms": latency_ms}  # fmt: skip
        url = f"{GATEWAY_URL}/{self.ns}/{model}/v1/chat/completions"
        return self.call(url, token, body, timeout_s)

    def close(self) -> None:
        self.kind.kubectl("delete", "account", self.account, "--wait=false", check=False)

    def apply(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        """The tenant creates or changes one of their objects. A Recharge names its
        submitter, as the chart's admission policy requires (the tenant's user)."""
        meta: dict[str, Any] = {"name": name, "namespace": self.ns}
        if kind == "Recharge":
            meta["annotations"] = {"gpucloud.dev/submitter": self.user}
        doc = {"apiVersion": "gpucloud.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}
        self.tenant_kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def review(self, recharge: str, decision: str = "Approve", reason: str = "") -> str:
        """The billing admin (the cluster's admin user) reviews a bank transfer, pinning
        the Recharge, its amount and its voucher as they see them now."""
        rc = self.kind.get_json("recharge", recharge, "-n", self.ns)
        admin = self.kind.kubectl(
            "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"
        ).stdout
        name = f"{self.ns}.{recharge}"
        self.kind.apply(
            [{
                "apiVersion": "gpucloud.dev/v1alpha1", "kind": "RechargeReview",
                "metadata": {"name": name, "annotations": {"gpucloud.dev/reviewer": admin}},
                "spec": {
                    "rechargeRef": {"namespace": self.ns, "name": recharge,
                                    "uid": rc["metadata"]["uid"]},
                    "amount": rc["spec"]["amount"], "voucherId": rc["status"]["orderId"],
                    "decision": decision, "reason": reason or "matched on the bank statement",
                },
            }]
        )  # fmt: skip
        return name

    def instance(
        self,
        name: str,
        product: str,
        count: int,
        command: list[str],
        quota_gi: int = 50,
        cloud_disks: list[str] | None = None,
        spot: dict[str, Any] | None = None,
        **billing: Any,
    ) -> None:
        """A GPUInstance running ``command`` in busybox as root (a tenant's image), which
        exits on SIGTERM as a well-behaved workload does (a shell as PID 1 would ignore
        it and hold every stop for the pod's whole grace period); ``spot``: spec.spot."""
        billing.setdefault("mode", "PayAsYouGo")
        command = ["sh", "-c", f'trap "exit 0" TERM; {shlex.join(command)} & wait']
        self.apply(
            "GPUInstance",
            name,
            {
                "gpu": {"product": product, "count": count},
                "billing": billing,
                "storage": {"quotaGi": quota_gi},
                "image": self.kind.busybox_image(),
                "command": command,
                "state": "Running",
                **({"cloudDisks": cloud_disks} if cloud_disks else {}),
                **({"spot": spot} if spot else {}),
            },
        )

    def patch_spec(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.tenant_kubectl(
            "patch", kind, name, "-n", self.ns, "--type=merge", "-p", json.dumps({"spec": spec})
        )

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return self.kind.get_json(kind, name, "-n", self.ns).get("status") or {}

    def wait_phase(self, kind: str, name: str, phase: str, timeout: float = 120) -> dict:
        def check() -> dict[str, Any] | None:
            st = self.status(kind, name)
            return st if st.get("phase") == phase else None

        return wait_for(check, timeout=timeout, interval=0.5, what=f"{kind} {name} to be {phase}")  # type: ignore[return-value]

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 120) -> Any:
        return wait_for(predicate, timeout=timeout, interval=0.5, what=what)

    def pod(self, instance: str) -> dict[str, Any] | None:
        proc = self.kind.kubectl(
            "get", "pod", f"{instance}-gpu", "-n", self.ns, "-o", "json", check=False
        )
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def logs(self, instance: str) -> str:
        return self.kind.kubectl("logs", f"{instance}-gpu", "-n", self.ns).stdout

    def events(self, name: str) -> list[str]:
        out = self.kind.get_json(
            "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}"
        )
        return [e["reason"] for e in out["items"]]

    # -- money ----------------------------------------------------------------------
    def sql(self, query: str, *params: object) -> list[list[Any]]:
        """A query on the ledger the API pod uses (``?`` placeholders)."""
        return ledger_sql(self.kind, query, *params, namespace=self.release_ns)

    def entries(self, prefix: str = "") -> list[dict[str, Any]]:
        rows = self.sql(
            "SELECT e.kind, e.amount_minor, e.key, e.resource, e.memo, e.meta "
            "FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id "
            "WHERE a.name = ? AND e.key LIKE ? ORDER BY e.id",
            self.account,
            prefix + "%",
        )
        names = ("kind", "amount", "key", "resource", "memo", "meta")
        out = [dict(zip(names, r, strict=True)) for r in rows]
        for e in out:
            e["meta"] = json.loads(e["meta"]) if isinstance(e["meta"], str) else e["meta"]
        return out

    def balance(self) -> int:
        rows = self.sql("SELECT balance_minor FROM ledger_accounts WHERE name = ?", self.account)
        return rows[0][0] if rows else 0

    def charges(self, resource: str | None = None) -> int:
        return -sum(
            e["amount"]
            for e in self.entries()
            if e["amount"] < 0 and (resource is None or e["resource"] == resource)
        )

    def pay_online(self, name: str, amount: str, now: datetime | None = None) -> dict[str, Any]:
        """A tenant's online recharge, paid: the provider's signed callback reaches the
        API through its Service (sent from inside the cluster, as a provider's would),
        signed at ``now`` (the test's file clock, when the release runs on one)."""
        self.apply(
            "Recharge",
            name,
            {"account": self.account, "method": "Online", "amount": amount,
             "online": {"provider": "sandbox"}},
        )  # fmt: skip
        return self.pay_order(name, amount, now)

    def pay_order(self, name: str, amount: str, now: datetime | None = None) -> dict[str, Any]:
        """Pay the order of the online Recharge ``name`` as the payment provider does."""
        order = self.wait(
            lambda: self.status("recharges", name).get("orderId"), f"recharge {name}'s order"
        )
        script = (
            "import sys\nfrom datetime import UTC, datetime\n"
            "from gpucloud.recharge.sandbox import SandboxProvider\n"
            "now = datetime.fromtimestamp(int(sys.argv[5]), UTC)\n"
            "r = SandboxProvider(sys.argv[1].encode()).pay(sys.argv[2], sys.argv[3],"
            " int(sys.argv[4]), 'CNY', now)\n"
            "print(r.status_code, r.text)\n"
        )
        # the provider's key: what the API was given (api.sandboxPayments.existingSecret)
        key = base64.b64decode(
            self.kind.kubectl(
                "get", "secret", "gpucloud-sandbox", "-n", self.release_ns,
                "-o", "jsonpath={.data.secret}",
            ).stdout
        ).decode()  # fmt: skip
        out = self.kind.kubectl(
            "exec", "-n", self.release_ns, API, "--", "python3", "-c", script,
            key, API_URL, order, str(to_minor(Decimal(amount))),
            str(int((now or datetime.now(UTC)).timestamp())),
        ).stdout  # fmt: skip
        assert out.startswith("200 "), out
        return self.wait_phase("recharges", name, "Credited")
