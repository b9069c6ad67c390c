"""Test bed figures: cold build time (recorded by the build) and warm cluster start.

Uses its own cluster name so the shared default test bed is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpucloud.testing.testbed import CACHE, Binaries, Testbed, versions


def cold_build_seconds() -> int | None:
    v = versions()
    dirs = [
        f"kwok-{v['KWOK_VERSION']}",
        f"etcd-{v['ETCD_VERSION']}",
        f"kubernetes-{v['K8S_VERSION']}",
        f"helm-{v['HELM_VERSION']}",
    ]
    total = 0
    for d in dirs:
        f = CACHE / d / ".build_seconds"
        if not f.exists():
            return None
        total += int(f.read_text())
    return total


def main() -> None:
    if (cold := cold_build_seconds()) is not None:
        print(f"testbed_cold_build_s: {cold} s")
    name = "gpucloud-bench"
    kubeconfig = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.kubeconfig"
    tb = Testbed(name=name, kubeconfig=kubeconfig, binaries=Binaries.from_cache())
    tb.ensure_binaries()
    tb.down()
    try:
        t0 = time.monotonic()
        tb.up()
        print(f"testbed_warm_start_s: {time.monotonic() - t0:.1f} s")
    finally:
        tb.down()


if __name__ == "__main__":
    main()
