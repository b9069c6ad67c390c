"""A tenant's view of gpucloud on the kind tier: custom resources through kubectl, money
read back from the ledger the API pod writes, payments sent as the provider would."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import yaml
from conftest import KIND_VALUES, SANDBOX_SECRET

from gpucloud.billing import to_minor
from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kube import wait_for

API = "deploy/gpucloud-api"
API_URL = "http://gpucloud-api.gpucloud-system.svc:8080"
# The kind release's prices (tests/kind/conftest.py): none divides evenly.
PRICES = {
    g["product"]: {"payg": Decimal(g["payAsYouGoPerHour"]), "spot": Decimal(g["spotPerHour"])}
    for g in KIND_VALUES["pricebook"]["gpus"]
}
STORAGE_PER_GIB_HOUR = Decimal(KIND_VALUES["pricebook"]["storage"]["instancePerGBHour"])


def per_second(price_per_hour: Decimal, gpus: int, seconds: int) -> int:
    """What a run of ``seconds`` costs, rounded once to the fen."""
    return to_minor(price_per_hour * gpus * seconds / 3600)


class KindHarness:
    def __init__(self, kind: KindCluster, namespace: str, release_ns: str) -> None:
        self.kind, self.ns, self.release_ns = kind, namespace, release_ns
        self.account = namespace  # one Account per test, named after its namespace

    # -- the tenant's objects -------------------------------------------------------
    def setup(self, instance_limit: int = 5) -> None:
        self.kind.apply(
            [
                {
                    "apiVersion": "gpucloud.dev/v1alpha1",
                    "kind": "Account",
                    "metadata": {"name": self.account},
                    "spec": {"namespaces": [self.ns], "instanceLimit": instance_limit},
                }
            ]
        )

    def close(self) -> None:
        self.kind.kubectl("delete", "account", self.account, "--wait=false", check=False)

    def apply(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        doc = {
            "apiVersion": "gpucloud.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        }
        self.kind.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def instance(
        self,
        name: str,
        product: str,
        count: int,
        command: list[str],
        quota_gi: int = 50,
        **billing: Any,
    ) -> None:
        """A GPUInstance running ``command`` in busybox as root (a tenant's image)."""
        billing.setdefault("mode", "PayAsYouGo")
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
            },
        )

    def patch_spec(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.kind.kubectl(
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
        """A read-only query on the ledger, inside the API's pod (SQLite: its volume)."""
        script = (
            "import json, sqlite3, sys\n"
            "db = sqlite3.connect('file:/var/lib/gpucloud/ledger/ledger.db?mode=ro', uri=True)\n"
            "rows = db.execute(sys.argv[1], json.loads(sys.argv[2])).fetchall()\n"
            "print(json.dumps([list(r) for r in rows]))\n"
        )
        out = self.kind.kubectl(
            "exec", "-n", self.release_ns, API, "--",
            "python3", "-c", script, query, json.dumps(list(params)),
        ).stdout  # fmt: skip
        return json.loads(out)

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
        out = self.kind.kubectl(
            "exec", "-n", self.release_ns, API, "--", "python3", "-c", script,
            SANDBOX_SECRET, API_URL, order, str(to_minor(Decimal(amount))),
            str(int((now or datetime.now(UTC)).timestamp())),
        ).stdout  # fmt: skip
        assert out.startswith("200 "), out
        return self.wait_phase("recharges", name, "Credited")
