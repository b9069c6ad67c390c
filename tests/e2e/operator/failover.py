"""HA on the test bed: two operator replicas with Kopf peering, the active one killed
(SIGKILL) in the middle of a burst of starts. Used by test_ha_e2e.py (asserts) and
bench/operator_failover_bench.py (prints ``operator_failover_s``)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import yaml
from chaos import PodWatch, run_charge
from opharness import Harness

from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import REPO, Testbed

A100 = "NVIDIA-A100-SXM4-80GB"
PRICE = Decimal("9.80")
PEERING_CRDS = REPO / "charts" / "gpucloud" / "crds" / "kopf" / "kopf.dev_peerings.yaml"


@dataclass
class StatusWatch:
    """When (monotonic) each GPUInstance status change was seen."""

    tb: Testbed
    namespace: str
    seen: list[tuple[float, str, str]] = field(default_factory=list)  # (t, name, phase)
    _proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [str(self.tb.bin.kubectl), "--kubeconfig", str(self.tb.kubeconfig), "get"]
        cmd += ["gpuinstances", "-n", self.namespace, "-w", "-o", "json"]
        self._proc = subprocess.Popen(
            cmd, env=self.tb.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        decoder, buf = json.JSONDecoder(), ""
        for line in self._proc.stdout:
            buf += line
            try:
                obj, _ = decoder.raw_decode(buf.strip())
            except json.JSONDecodeError:
                continue
            buf = ""
            phase = (obj.get("status") or {}).get("phase", "")
            self.seen.append((time.monotonic(), obj["metadata"]["name"], phase))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def phase_changes(self) -> list[tuple[float, str, str]]:
        last: dict[str, str] = {}
        out = []
        for t, name, phase in list(self.seen):
            if phase != last.get(name, ""):
                out.append((t, name, phase))
            last[name] = phase
        return out


@dataclass
class Failover:
    failover_s: float  # kill -> the standby's first change of an instance's phase
    late_s: float  # kill -> an instance created after the kill has a phase (standby's)
    running_before_kill: int
    problems: list[str]


def two_replicas(tb: Testbed, namespace: str, tmp: Path) -> tuple[Harness, Harness]:
    tb.kubectl("apply", "-f", str(PEERING_CRDS))
    tb.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev")
    peering = f"gpucloud-{namespace}"
    tb.apply(
        [{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}]
    )
    replicas = []
    for priority in (200, 100):  # the first is active, the second stands by
        h = Harness(tb, namespace, tmp, peering_priority=priority, peering_lifetime_s=6)
        h.mode_args = ["--peering", peering]
        h.log = tmp / f"operator-{priority}.log"
        replicas.append(h)
    return replicas[0], replicas[1]


def run(tb: Testbed, namespace: str, tmp: Path, burst: int = 12) -> Failover:
    active, standby = two_replicas(tb, namespace, tmp)
    active.setup(instance_limit=burst + 1)
    active.fund(10_000_00)
    nodes = get_json(tb, "nodes")["items"]
    capacity = {
        n["metadata"]["name"]: int(n["status"]["allocatable"].get("nvidia.com/gpu", 0))
        for n in nodes
    }
    pods, statuses = PodWatch(tb, namespace, active.clock, capacity), StatusWatch(tb, namespace)
    pods.start()
    statuses.start()
    try:
        active.start()
        standby.start()

        def both_peers() -> bool:  # each replica's heartbeat is in the peering object
            obj = get_json(tb, "clusterkopfpeering", f"gpucloud-{namespace}")
            return len(obj.get("status") or {}) == 2

        standby.wait(both_peers, "both replicas in the peering object")
        docs = [instance(namespace, f"i{n}") for n in range(burst)]
        tb.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        active.wait(lambda: any(p == "Running" for _, _, p in statuses.seen), "the first Running")
        running = len({n for _, n, p in statuses.seen if p == "Running"})
        killed = time.monotonic()
        active.kill()
        tb.kubectl("apply", "-f", "-", input=yaml.safe_dump(instance(namespace, "late")))
        names = [d["metadata"]["name"] for d in docs] + ["late"]
        standby.wait(
            lambda: all(standby.status(n).get("phase") == "Running" for n in names),
            "every instance Running under the standby",
            timeout=120,
        )
        # phase changes only (Kopf's own annotations change the object too), and not in
        # the first second: a patch the killed replica sent may still be on its way
        after = [t for t, _, _ in statuses.phase_changes() if t > killed + 1.0]
        late = [t for t, n, p in statuses.seen if n == "late" and p]
        failover_s, late_s = after[0] - killed, late[0] - killed
        standby.advance(600)
        for n in names:
            standby.patch_spec(n, {"state": "Stopped"})
        standby.wait(
            lambda: all(standby.status(n).get("phase") == "Stopped" for n in names),
            "every instance Stopped",
            timeout=120,
        )
        standby.wait(lambda: pods.caught_up(get_json(tb, "pods", "-n", namespace)["items"]), "pods")
        standby.advance(61)
        standby.wait(
            lambda: (
                all(m.settled_at for m in standby.ledger.meters(standby.account))
                and len(standby.ledger.meters(standby.account)) == len(names)
            ),
            "every run settled",
            timeout=60,
        )
        return Failover(failover_s, late_s, running, check(standby, pods))
    finally:
        pods.stop()
        statuses.stop()
        standby.close()  # stops it, deletes the Account
        active.close()
        tb.kubectl("delete", "clusterkopfpeering", f"gpucloud-{namespace}", check=False)


def instance(namespace: str, name: str) -> dict:
    return {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gpu": {"product": A100, "count": 1},
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": 50},
            "state": "Running",
        },
    }


def check(h: Harness, pods: PodWatch) -> list[str]:
    """Each pod that ran billed once, from its start to its deletion (the oracle of the
    chaos test); no GPU given out twice."""
    problems = list(pods.overcommits)
    records = {r.uid: r for r in pods.records()}
    meters = h.ledger.meters(h.account)
    ran = {u for u, r in records.items() if r.start is not None}
    if {m.subject for m in meters} != ran:
        problems.append(f"meters for {len(meters)} pods, {len(ran)} ran")
    entries = h.ledger.entries(h.account, limit=10_000)
    for m in meters:
        rec = records.get(m.subject)
        if rec is None or rec.start is None or rec.deleted is None:
            problems.append(f"meter {m.meter_id}: no such pod seen")
            continue
        want = run_charge(PRICE, 1, int((rec.deleted - rec.start).total_seconds()))
        keys = (f"meter:{m.meter_id}:", f"meter-fallback:{m.meter_id}")
        got = -sum(e.amount_minor for e in entries if e.key.startswith(keys))
        if (got, m.opened_at, m.closed_at) != (want, rec.start, rec.deleted):
            problems.append(
                f"{rec.instance}: billed {got} for {m.opened_at}->{m.closed_at}, "
                f"oracle {want} for {rec.start}->{rec.deleted}"
            )
    return problems
