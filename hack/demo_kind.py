"""`make demo-kind`: docs/install.md's story on the kind tier, in real pods.

The shell blocks of docs/install.md marked ``<!-- make demo-kind: NAME -->`` are read
from the page and run as written (so the page cannot drift from what works):

1. ``install``: the chart from our images in the kind cluster's registry (`make kind`
   has built and pushed them);
2. ``tenant``: the first tenant, account `acme` for namespace `acme-research`, an online
   recharge and a bank transfer with its admin review (examples/); the demo then plays
   the payment provider and sends the signed callback for the online order;
3. a pay-as-you-go H100 instance runs in a real pod with its GPUs' UUIDs, metered by
   its node's agent, while a live table shows it and the balance; a stop settles it by
   the second; the statement is read back from the ledger;
4. ``upgrade``: a changed value rolls the operator.

Re-runs tolerate objects that exist already (``kubectl create`` of the namespace or the
Secret says it exists already; anything else stops the demo).

`DEMO_SECONDS` (default 45) sets how long the instance runs. The cluster and the release
stay up afterwards (`make kind-down` removes them).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime

from gpucloud.billing import format_money
from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kindrelease import RELEASE_NAMESPACE, KindHarness
from gpucloud.testing.testbed import REPO, Binaries

NS = "acme-research"
ACCOUNT = "acme"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def doc_block(name: str) -> list[str]:
    """The commands of the docs/install.md block marked ``make demo-kind: name``
    (continuation lines joined, comments kept)."""
    text = (REPO / "docs" / "install.md").read_text()
    m = re.search(rf"<!-- make demo-kind: {name} -->\n```bash\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit(f"demo: docs/install.md has no block marked 'make demo-kind: {name}'")
    return m.group(1).replace("\\\n", "").splitlines()


def run_block(name: str) -> None:
    """Run a docs block in one bash, echoing each command, with our kubectl and helm."""
    lines = ["set -euo pipefail", f"cd {shlex.quote(str(REPO))}"]
    for command in doc_block(name):
        if not command.strip():
            continue
        lines.append(f"echo {shlex.quote('$ ' + ' '.join(command.split()))}")
        if re.match(r"^kubectl\b.*\bcreate\b", command):
            body = command.split("#")[0]
            lines.append(f"out=$({body} 2>&1) || grep -qi 'already exists' <<<\"$out\"")
            lines.append('echo "$out"')
        else:
            lines.append(command)
    b = Binaries.from_cache()
    env = dict(os.environ)
    env["PATH"] = f"{b.kubectl.parent}:{b.helm.parent}:{env['PATH']}"
    # the shell of section 3's `export KUBECONFIG=...`, kept for the later blocks
    env["KUBECONFIG"] = str(KindCluster().kubeconfig)
    subprocess.run(["bash", "-c", "\n".join(lines)], env=env, check=True, timeout=900)


def show(cluster: KindCluster, *args: str) -> None:
    print("$ kubectl " + shlex.join(args), flush=True)
    print(cluster.kubectl(*args).stdout.rstrip(), flush=True)


def money(minor: int) -> str:
    return format_money(minor, "CNY")


def main() -> int:
    seconds = int(os.environ.get("DEMO_SECONDS", "45"))
    cluster = KindCluster()
    banner("kind cluster: fake GPU nodes, our images in its registry (make kind)")
    cluster.up()
    show(cluster, "get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "nvidia.com/gpu.count")

    banner("install (docs/install.md, section 3)")
    t0 = time.monotonic()
    run_block("install")
    print(f"helm install to every pod Ready: {time.monotonic() - t0:.0f} s", flush=True)
    show(cluster, "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide")

    banner("the first tenant (docs/install.md, section 5)")
    run_block("tenant")
    tenant = KindHarness(cluster, NS, RELEASE_NAMESPACE, account=ACCOUNT)
    banner("the payment provider pays the online order (signed callback to the API)")
    tenant.pay_order("topup-500", "500.00")
    tenant.wait_phase("recharges", "transfer-20261126", "Credited")
    show(cluster, "get", "recharges", "-n", NS)
    print(f"balance: {money(tenant.balance())}", flush=True)
    banner("a tenant's script reads its balance with its own token (docs/install.md, section 5)")
    run_block("tenant-api")

    banner("a pay-as-you-go H100 instance in a real pod")
    script = 'echo "my GPUs: $NVIDIA_VISIBLE_DEVICES"; exec sleep 86400'
    tenant.instance("notebook-h100", "NVIDIA-H100-80GB-HBM3", 2, ["sh", "-c", script])
    tenant.wait_phase("gpuinstances", "notebook-h100", "Running")
    tenant.wait(lambda: "my GPUs" in tenant.logs("notebook-h100"), "the instance's output")
    print(tenant.logs("notebook-h100").strip(), flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = tenant.status("gpuinstances", "notebook-h100")
        print(
            f"{time.strftime('%H:%M:%S')}  {st.get('phase'):8} {st.get('gpuSummary', '')}"
            f"  accrued {st.get('accruedCost', '0.00')} CNY  balance {money(tenant.balance())}",
            flush=True,
        )
        time.sleep(5)

    banner("stop: the run is billed by the second from the agent's GPU-seconds")
    tenant.patch_spec("gpuinstances", "notebook-h100", {"state": "Stopped"})
    st = tenant.wait_phase("gpuinstances", "notebook-h100", "Stopped")
    ran = datetime.fromisoformat(st["stoppedAt"]) - datetime.fromisoformat(st["startedAt"])

    def rated() -> int:
        rows = tenant.sql(
            "SELECT quantity_rated FROM ledger_meters WHERE resource = ? AND kind = 'gpu_time'",
            f"{NS}/notebook-h100",
        )
        return sum(int(r[0]) for r in rows)

    # the agent ships every few seconds; the meter is settled for good (and any second
    # the agents missed billed from the control plane) after metering_grace_s (300 s)
    tenant.wait(lambda: rated() >= 2 * (ran.total_seconds() - 2), "the agent's last usage")
    print(f"ran {ran.total_seconds():.0f} s on 2 GPUs: {rated()} GPU-seconds rated", flush=True)
    show(cluster, "get", "gpucloud", "-n", NS)

    banner(f"statement of account {ACCOUNT}")
    for e in tenant.entries():
        print(f"{e['kind']:10} {money(e['amount']):>14}  {e['memo']}", flush=True)
    print(f"{'balance':10} {money(tenant.balance()):>14}", flush=True)

    banner("upgrade (docs/install.md, section 6)")
    run_block("upgrade")
    show(cluster, "get", "pods", "-n", RELEASE_NAMESPACE)
    print(f"\nThe cluster stays up: export KUBECONFIG={cluster.kubeconfig}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
