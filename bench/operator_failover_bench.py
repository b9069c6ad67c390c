"""Operator failover and restart figures, on a test bed cluster of its own
(GPUCLOUD_TESTBED_NAME, default ``gpucloud-failover``; deleted afterwards).

``operator_failover_s`` (goal <= 10 s): two replicas with Kopf peering
(tests/e2e/operator/failover.py), the active one SIGKILLed while a burst of 12
GPUInstances starts; from the kill to the first change of an instance's phase the
standby makes (changes in the first second after the kill are not counted: a patch the
killed replica sent may still be on its way).
``operator_failover_late_s``: from the kill to the status of an instance created just
after it. The runs are then stopped and checked against the pods' own records (the
chaos test's oracle); the bench fails if a run is billed wrong.
``operator_restart_healthy_s`` and ``operator_restart_reconcile_s``: one replica killed,
an instance stopped while it is down, the operator started again: from the start of the
process to its liveness endpoint answering, and to its first pass (the stop carried out).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Binaries, Testbed

sys.path.insert(0, str(REPO / "tests" / "e2e" / "operator"))
import failover
from opharness import Harness


def restart(tb: Testbed, tmp: Path, ns: str) -> tuple[float, float]:
    tb.kubectl("create", "namespace", ns)
    h = Harness(tb, ns, tmp)
    h.setup()
    h.fund(1000_00)
    watch = failover.StatusWatch(tb, ns)
    watch.start()
    try:
        h.start()
        h.instance("r", failover.A100)
        h.wait_phase("r", "Running")
        h.kill()
        h.patch_spec("r", {"state": "Stopped"})
        t0 = time.monotonic()
        h.start()
        healthy = time.monotonic() - t0
        h.wait_phase("r", "Stopped")
        seen = [t for t, n, p in watch.seen if t > t0 and p in ("Stopping", "Stopped")]
        return healthy, seen[0] - t0
    finally:
        watch.stop()
        h.close()


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-failover")
    tmp = Path(tempfile.mkdtemp(prefix="failover-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    tb = Testbed(name=name, kubeconfig=kubeconfig, binaries=Binaries.from_cache())
    try:
        tb.up()
        install_crds(tb)
        suffix = uuid.uuid4().hex[:5]  # a namespace of its own on a reused cluster
        tb.kubectl("create", "namespace", f"failover-{suffix}")
        (tmp / "ha").mkdir()
        result = failover.run(tb, f"failover-{suffix}", tmp / "ha", burst=12)
        print(f"operator_failover_s: {result.failover_s:.1f} s", flush=True)
        print(f"operator_failover_late_s: {result.late_s:.1f} s", flush=True)
        print(f"# {result.running_before_kill} of 12 Running at the kill", file=sys.stderr)
        (tmp / "restart").mkdir()
        healthy, reconcile = restart(tb, tmp / "restart", f"restart-{suffix}")
        print(f"operator_restart_healthy_s: {healthy:.1f} s", flush=True)
        print(f"operator_restart_reconcile_s: {reconcile:.1f} s", flush=True)
        if result.problems:
            print("\n".join(result.problems), file=sys.stderr)
            return 1
        return 0
    finally:
        if "GPUCLOUD_TESTBED_NAME" not in os.environ:
            tb.down()


if __name__ == "__main__":
    sys.exit(main())
