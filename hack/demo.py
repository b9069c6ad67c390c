"""`make demo`: the whole flow on the local test bed, with live billing.

1. the kwok test bed (a real control plane, fake GPU nodes), the CRDs and the price book;
2. the metering API, the operator and one agent per GPU node, as local processes sharing
   one SQLite ledger (the pod-resources servers follow the pods the scheduler placed);
3. a tenant account funded by an online recharge (paid through the sandbox provider's
   signed callback) and a bank transfer approved by an admin's RechargeReview;
4. instances of every billing mode, a spot instance preempted by a pay-as-you-go one,
   a stop that settles by the second;
5. a live table of instances and the balance, then the release of everything and the
   account's statement.

`DEMO_SECONDS` (default 75) sets how long the live table runs. At the end every instance
is released (settled, then deleted) and the processes stop; the test bed stays up
(`make testbed-down` removes it). Logs and the ledger are in `.demo/`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import yaml

from gpucloud.api.testserver import SANDBOX_SECRET, ApiProcess, agent_token, free_port
from gpucloud.billing import format_money
from gpucloud.ledger import open_ledger
from gpucloud.recharge.sandbox import SandboxProvider
from gpucloud.testing.kube import delete_namespace, install_crds
from gpucloud.testing.testbed import REPO, Testbed

NS = "acme-research"
ACCOUNT = "acme"
WORK = REPO / ".demo"
GROUP = "gpucloud.dev/v1alpha1"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def wait(what: str, predicate: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise SystemExit(f"demo: timed out waiting for {what}")


class Demo:
    def __init__(self) -> None:
        self.tb = Testbed()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api: ApiProcess | None = None

    # -- processes ---------------------------------------------------------------
    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (WORK / f"{name}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        )

    def start_services(self, gpu_nodes: list[str]) -> None:
        self.api = ApiProcess(WORK / "api", nodes=gpu_nodes).start()
        ledger_url = self.api.database_url
        print(f"metering API     {self.api.url}   (ledger {ledger_url})")
        print(f"billing console  {self.api.url}/console/   (demo token: tenant-token)")
        kube = ["--kubeconfig", str(self.tb.kubeconfig)]
        for node in gpu_nodes:
            sock = WORK / f"{node}.sock"
            token = WORK / f"{node}.token"
            token.write_text(agent_token(node))
            self.spawn(
                f"podresources-{node}",
                ["-m", "gpucloud_agent.main", "serve-podresources", "--node-name", node,
                 "--socket", str(sock), *kube],
            )  # fmt: skip
            self.spawn(
                f"agent-{node}",
                ["-m", "gpucloud_agent.main", "run", "--node-name", node, "--nvml", "fake",
                 "--fake-from-kube", *kube, "--pod-resources-socket", str(sock),
                 "--api-url", self.api.url, "--token-file", str(token),
                 "--wal-dir", str(WORK / f"wal-{node}"), "--metrics-address", "127.0.0.1",
                 "--metrics-port", str(free_port())],
            )  # fmt: skip
        print(f"agents           {len(gpu_nodes)} (one per GPU node, fake NVML, real gRPC)")
        operator_env = {
            "KUBECONFIG": str(self.tb.kubeconfig),
            "GPUCLOUD_LEDGER_URL": ledger_url,
            # Short periods so that the demo shows the rules within a minute or two.
            "GPUCLOUD_OPERATOR_TICK_INTERVAL_S": "1",
            "GPUCLOUD_OPERATOR_ACCOUNT_INTERVAL_S": "1",
            "GPUCLOUD_OPERATOR_RECHARGE_INTERVAL_S": "0.5",
            "GPUCLOUD_OPERATOR_COST_REFRESH_S": "2",
            "GPUCLOUD_OPERATOR_PREEMPTION_GRACE_S": "15",
            "GPUCLOUD_OPERATOR_METERING_GRACE_S": "30",
            "GPUCLOUD_OPERATOR_NAMESPACES": NS,
        }
        port = free_port()
        self.spawn(
            "operator",
            ["-m", "gpucloud_operator.main", "--standalone", "--all-namespaces",
             "--liveness", f"http://127.0.0.1:{port}/healthz"],
            operator_env,
        )  # fmt: skip
        print("operator         Kopf, standalone (logs in .demo/operator.log)")

    def stop_services(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.api is not None:
            self.api.stop()

    # -- cluster helpers -----------------------------------------------------------
    def apply(self, *docs: dict) -> None:
        self.tb.apply(list(docs))

    def get(self, kind: str, name: str, ns: str | None = NS) -> dict:
        args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
        proc = self.tb.kubectl(*args, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def status(self, kind: str, name: str, ns: str | None = NS) -> dict:
        return self.get(kind, name, ns).get("status") or {}

    def instance(self, name: str, product: str, count: int, billing: dict) -> dict:
        return {
            "apiVersion": GROUP,
            "kind": "GPUInstance",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "gpu": {"product": product, "count": count},
                "billing": billing,
                "storage": {"quotaGi": 50},
                "state": "Running",
            },
        }

    def phase_is(self, name: str, *phases: str) -> Callable[[], bool]:
        return lambda: self.status("gpuinstance", name).get("phase") in phases

    # -- the story -----------------------------------------------------------------
    def run(self, seconds: float) -> None:
        banner("1. test bed, CRDs, price book")
        t0 = time.monotonic()
        self.tb.up()
        print(f"control plane ready in {time.monotonic() - t0:.1f} s; "
              f"export KUBECONFIG={self.tb.kubeconfig}")  # fmt: skip
        print(self.tb.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product").stdout)
        install_crds(self.tb)
        self.tb.kubectl("apply", "-f", str(REPO / "examples" / "pricebook.yaml"))
        # A fresh tenant each run: the ledger is new, so is the namespace.
        delete_namespace(self.tb, NS)
        for obj in ("account/" + ACCOUNT, "rechargereview/acme-research.transfer-20261126"):
            # Left by an earlier run; its operator is gone, so drop the finalizer too.
            self.tb.kubectl("delete", obj, "--wait=false", check=False)
            drop = '[{"op": "remove", "path": "/metadata/finalizers"}]'
            self.tb.kubectl("patch", obj, "--type=json", "-p", drop, check=False)
        self.tb.kubectl("create", "namespace", NS)

        banner("2. API, operator, agents")
        gpu_nodes = [
            n["metadata"]["name"]
            for n in self.tb.nodes()
            if "nvidia.com/gpu" in n["status"]["capacity"]
        ]
        self.start_services(gpu_nodes)

        banner("3. a funded account: online recharge + bank transfer")
        self.apply(yaml.safe_load((REPO / "examples" / "account.yaml").read_text()))
        for doc in ("recharge-online.yaml", "recharge-bank-transfer.yaml"):
            self.apply(yaml.safe_load((REPO / "examples" / doc).read_text()))
        online = wait("the payment order", lambda: self.status("recharge", "topup-500").get(
            "orderId") and self.status("recharge", "topup-500"))  # fmt: skip
        print(f"online order {online['orderId']}: scan {online.get('paymentURL')}")
        assert self.api is not None
        reply = SandboxProvider(SANDBOX_SECRET.encode()).pay(
            self.api.url, online["orderId"], 50000, "CNY", datetime.now(UTC)
        )
        print(f"sandbox provider's signed callback -> HTTP {reply.status_code}")
        wait("the online recharge", lambda: self.status("recharge", "topup-500").get("phase")
             == "Credited")  # fmt: skip
        wait("the transfer to await review", lambda: self.status(
            "recharge", "transfer-20261126").get("phase") == "AwaitingReview")  # fmt: skip
        # The admin pins what they checked: the Recharge's uid, amount and voucher.
        seen = self.get("recharge", "transfer-20261126")
        review = yaml.safe_load((REPO / "examples" / "rechargereview.yaml").read_text())
        review["spec"]["rechargeRef"]["uid"] = seen["metadata"]["uid"]
        review["spec"] |= {"amount": seen["spec"]["amount"], "voucherId": seen["status"]["orderId"]}
        self.apply(review)
        wait("the approved transfer", lambda: self.status(
            "recharge", "transfer-20261126").get("phase") == "Credited")  # fmt: skip
        print(self.tb.kubectl("get", "recharges", "-n", NS).stdout)
        print(self.tb.kubectl("get", "account", ACCOUNT).stdout)

        banner("4. instances of every billing mode")
        self.apply(
            self.instance("notebook", "NVIDIA-A100-SXM4-80GB", 1, {"mode": "PayAsYouGo"}),
            self.instance("training", "NVIDIA-H100-80GB-HBM3", 4,
                          {"mode": "Package", "period": "Day", "autoRenew": True}),
            self.instance("sweep", "NVIDIA-GeForce-RTX-4090", 4, {"mode": "Spot"}),
        )  # fmt: skip
        for name in ("notebook", "training", "sweep"):
            wait(f"{name} to run", self.phase_is(name, "Running"), timeout=120)
        print(self.tb.kubectl("get", "gi", "-n", NS, "-o", "wide").stdout)

        banner("5. a pay-as-you-go instance preempts the spot instance")
        self.apply(self.instance("inference", "NVIDIA-GeForce-RTX-4090", 2,
                                 {"mode": "PayAsYouGo"}))  # fmt: skip
        wait("the preemption notice", lambda: self.status("gpuinstance", "sweep").get(
            "preemptAt"))  # fmt: skip
        print(self.tb.kubectl("get", "events", "-n", NS,
                              "--field-selector", "involvedObject.name=sweep").stdout)  # fmt: skip
        wait("the spot instance to stop after its grace period",
             self.phase_is("sweep", "Preempted"), timeout=120)  # fmt: skip
        wait("inference to run", self.phase_is("inference", "Running"), timeout=120)

        banner(f"6. live billing for {seconds:.0f} s (the notebook stops half-way)")
        self.live(seconds)

        banner("7. release: each instance settles to the second, then its pod and volume go")
        self.tb.kubectl("delete", "gi", "--all", "-n", NS, "--wait=false")
        wait("every instance to be released", lambda: not self.tb.kubectl(
            "get", "gi", "-n", NS, "-o", "name").stdout.strip(), timeout=180)  # fmt: skip
        print(self.tb.kubectl("get", "pods,pvc", "-n", NS).stdout or "no pods, no volumes left")

        banner("statement")
        self.statement()
        self.tb.kubectl("delete", "namespace", NS, "--wait=false")

    def live(self, seconds: float) -> None:
        assert self.api is not None
        ledger = open_ledger(self.api.database_url)
        try:
            end = time.monotonic() + seconds
            stopped = False
            while time.monotonic() < end:
                if not stopped and time.monotonic() > end - seconds / 2:
                    self.tb.kubectl("patch", "gi", "notebook", "-n", NS, "--type=merge",
                                    "-p", '{"spec":{"state":"Stopped"}}')  # fmt: skip
                    stopped = True
                    print(">>> kubectl patch gi notebook: state Stopped (settles by the second)")
                now = datetime.now(UTC)
                print(f"--- {now:%H:%M:%S}  balance "
                      f"{format_money(ledger.balance(ACCOUNT), 'CNY')}  available "
                      f"{format_money(ledger.available_balance(ACCOUNT, now), 'CNY')}")  # fmt: skip
                print(self.tb.kubectl("get", "gi", "-n", NS).stdout, flush=True)
                time.sleep(5)
        finally:
            ledger.close()

    def statement(self) -> None:
        assert self.api is not None
        ledger = open_ledger(self.api.database_url)
        try:
            for e in ledger.entries(ACCOUNT, limit=1000):
                print(f"{e.at:%H:%M:%S}  {e.kind:<10} {format_money(e.amount_minor, 'CNY'):>16}"
                      f"  = {format_money(e.balance_after, 'CNY'):>16}  {e.memo[:60]}")  # fmt: skip
            usage = ledger.usage_summary(namespace=NS, kind="gpu_time")
            print(f"metered GPU-seconds in {NS}: {sum(u.gpu_seconds for u in usage)}")
        finally:
            ledger.close()


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    demo = Demo()
    try:
        demo.run(float(os.environ.get("DEMO_SECONDS", "75")))
    finally:
        demo.stop_services()
    print(f"\nThe test bed is still up: export KUBECONFIG={demo.tb.kubeconfig}; "
          "`make testbed-down` removes it.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
