"""`make demo`: the test bed, the CRDs and price book, the examples, shown with kubectl.

Starts (or reuses) the kwok test bed with fake GPU nodes, installs the API, applies a
realistic manifest of every kind into the `acme-research` namespace, and prints what a
tenant and an admin see with `kubectl get`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Testbed

NAMESPACE = "acme-research"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main() -> int:
    tb = Testbed()
    banner("test bed")
    kubeconfig = tb.up()
    print(f"kubeconfig: {kubeconfig}   (export KUBECONFIG={kubeconfig})")
    print(tb.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.count").stdout)

    banner("CRDs and price book")
    install_crds(tb)
    print(tb.kubectl("get", "crd", "-l", "app.kubernetes.io/part-of=gpucloud").stdout)
    tb.kubectl("create", "namespace", NAMESPACE, check=False)
    examples = sorted((REPO / "examples").glob("*.yaml"))
    for path in examples:
        doc = yaml.safe_load(Path(path).read_text())
        tb.apply(yaml.safe_dump(doc))
    print(tb.kubectl("get", "pricebooks,accounts,rechargereviews").stdout)

    banner(f"tenant view: kubectl get gpucloud -n {NAMESPACE}")
    print(tb.kubectl("get", "gpucloud", "-n", NAMESPACE).stdout)
    print(f"Try: KUBECONFIG={kubeconfig} kubectl describe gi notebook-a100 -n {NAMESPACE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
