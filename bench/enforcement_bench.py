"""Arrears enforcement figures: how late the operator shuts down the pods of an account
whose money has run out, and how far below zero the account ends.

200 pay-as-you-go GPUInstances (alternately 1 x A100 at 9.80/h and 2 x L40S at
5.20/h) across 50 Accounts, 4 each, on a test bed cluster of its own
(GPUCLOUD_TESTBED_NAME, default ``gpucloud-enforcement``; deleted afterwards). The
operator runs with the chart's default settings (``operator.config`` of the chart's
values.yaml: instance tick 10 s, account pass 15 s, metering grace 300 s) and a file
clock that the bench advances smoothly at real-time rate (BENCH_CLOCK_RATE, clock
seconds per real second). Once every instance runs, each account's balance is set (an
admin adjustment) so that it runs out at a known instant, 40 s to ~100 s ahead and
1.2 s apart. The oracle: from the prices and each run's start (``status.meterSince``)
the bench computes, per account, the first whole second at which the runs' costs,
each rounded to fen half to even, exceed the balance (the arrears rule of
docs/arrears.md: the available balance below zero). A watch on the pods (the
Kubernetes client, stamped with the file clock on receipt) sees each pod's deletion
(the first event with a deletionTimestamp, or its DELETED event).

Prints ``enforcement_lag_p95_s`` (goal <= 2) and ``enforcement_lag_max_s``: per pod,
the deletion's clock instant minus its account's run-out instant, in clock seconds;
then the clock jumps past the metering grace, every run is settled, and
``overdraft_max_minor``: the largest amount any account ends below zero, in minor units
(fen). On stderr: the load average before and after, the operator's CPU, and where the
lag goes (run-out -> the account's ``arrearsSince`` -> the pod's deletion). The bench
fails when a pod is deleted before its account ran out, or an account ran out with a
pod left running. BENCH_PROFILE=<file> records the operator with py-spy during the
enforcement phase (collapsed stacks; py-spy is a dev dependency).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from gpucloud_operator.builders import INSTANCE_LABEL
from operator_bench import (
    cpu_s,
    percentile,
    start_operator,
    start_profiler,
    stop_process,
    stop_profiler,
)
from urllib3.exceptions import ProtocolError

from gpucloud.clock import FileClock
from gpucloud.kube_names import MANAGED_BY
from gpucloud.ledger import EntryKind, open_ledger
from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Binaries, Testbed, parse_node_mix

ACCOUNTS, PER_ACCOUNT = 50, 4
LEAD_S, STAGGER_S = 40, 1.2  # the first account runs out LEAD_S after the balances are set
RATE = float(os.environ.get("BENCH_CLOCK_RATE", "1"))
NODES = "NVIDIA-L40S:25:8,NVIDIA-A100-SXM4-80GB:25:8"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
Obj = dict[str, Any]


def chart_config() -> dict[str, str]:
    """The operator settings the chart sets by default, as the chart passes them."""
    values = yaml.safe_load((REPO / "charts/gpucloud/values.yaml").read_text())
    return {
        f"GPUCLOUD_OPERATOR_{k.upper()}": str(v)
        for k, v in values["operator"]["config"].items()
        if k != "namespaces"
    }


def prices() -> dict[str, Fraction]:
    """Pay-as-you-go price per GPU-second in fen, by product (the example price book)."""
    book = yaml.safe_load((REPO / "examples/pricebook.yaml").read_text())
    return {
        g["product"]: Fraction(g["payAsYouGoPerHour"]) * 100 / 3600 for g in book["spec"]["gpus"]
    }


def cost(runs: list[tuple[Fraction, int]], at: int) -> int:
    """What the runs (fen per second, start second) owe at second ``at``: each rounded
    on its own, half to even (one meter per run)."""
    return sum(round(rate * max(0, at - start)) for rate, start in runs)


def run_out(runs: list[tuple[Fraction, int]], balance: int) -> int:
    """The oracle: the first whole second at which the runs cost more than ``balance``."""
    per_s = sum(rate for rate, _ in runs)
    s = max(start for _, start in runs) + int(balance / per_s) - 120
    while cost(runs, s) > balance:
        s -= 60
    while cost(runs, s) <= balance:
        s += 1
    return s


class SmoothClock:
    """The file clock, advanced every 20 ms at ``RATE`` clock seconds per real second."""

    def __init__(self, path: Path) -> None:
        self.file = FileClock(path)
        self.file.set(T0)
        self._base, self._m0 = T0, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now_s(self) -> float:
        with self._lock:
            return self._now_s()

    def jump(self, seconds: float) -> None:
        with self._lock:
            self._base = datetime.fromtimestamp(self._now_s() + seconds, UTC)
            self._m0 = time.monotonic()
            self.file.set(self._base)

    def _now_s(self) -> float:  # under _lock
        return self._base.timestamp() + (time.monotonic() - self._m0) * RATE

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                self.file.set(datetime.fromtimestamp(self._now_s(), UTC))

    def stop(self) -> None:
        self._stop.set()


class PodDeletions:
    """When each instance pod's deletion was first seen (clock seconds), from one watch."""

    def __init__(self, kubeconfig: Path, clock: SmoothClock) -> None:
        api = kubernetes.config.new_client_from_config(str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(api)
        self.clock = clock
        self.deleted: dict[tuple[str, str], float] = {}
        self.running: set[tuple[str, str]] = set()
        self._watch = kubernetes.watch.Watch()
        self._closed = False
        self.events: Counter[str] = Counter()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        since: dict[str, str] = {}  # resume from the last resourceVersion seen
        while not self._closed:
            try:
                for ev in self._watch.stream(
                    self.core.list_pod_for_all_namespaces,
                    label_selector=selector,
                    timeout_seconds=120,
                    **since,
                ):
                    self._seen(ev)
            except (ProtocolError, kubernetes.client.ApiException) as exc:
                print(
                    f"# pod watch reconnects at clock {self.clock.now_s():.1f} after "
                    f"{sum(self.events.values())} events: {exc}",
                    file=sys.stderr,
                )
                if getattr(exc, "status", None) == 410:  # too old: list again
                    self._watch.resource_version = None
            rv = self._watch.resource_version
            since = {"resource_version": rv} if rv else {}

    def _seen(self, ev: Obj) -> None:
        seen = self.clock.now_s()
        self.events[ev["type"]] += 1
        pod = ev["object"]
        # the instance the pod runs (pods are named per run)
        key = (pod.metadata.namespace, (pod.metadata.labels or {}).get(INSTANCE_LABEL, ""))
        if ev["type"] == "DELETED" or pod.metadata.deletion_timestamp is not None:
            self.deleted.setdefault(key, seen)
        elif pod.status.phase == "Running":
            self.running.add(key)

    def close(self) -> None:
        self._closed = True
        self._watch.stop()


def instance(ns: str, i: int) -> Obj:
    a100 = i % 2 == 0
    return {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": f"i{i}", "namespace": ns},
        "spec": {
            "gpu": {
                "product": "NVIDIA-A100-SXM4-80GB" if a100 else "NVIDIA-L40S",
                "count": 1 if a100 else 2,
            },
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": 20},
        },
    }


def stamp(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-enforcement")
    tmp = Path(tempfile.mkdtemp(prefix="enfbench-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    tb = Testbed(
        name=name, kubeconfig=kubeconfig, binaries=Binaries.from_cache(), controller_qps=100
    )
    namespaces = [f"enf-{a:02d}" for a in range(ACCOUNTS)]
    accounts = {f"acct-{a:02d}": ns for a, ns in enumerate(namespaces)}
    proc: subprocess.Popen[bytes] | None = None
    clock: SmoothClock | None = None
    try:
        tb.up(nodes=parse_node_mix(NODES))
        install_crds(tb)
        tb.kubectl("apply", "-f", str(REPO / "examples" / "pricebook.yaml"))
        tb.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                for ns in namespaces
            ]
        )
        tb.apply(
            [
                {
                    "apiVersion": "gpucloud.dev/v1alpha1",
                    "kind": "Account",
                    "metadata": {"name": acct},
                    "spec": {"namespaces": [ns], "instanceLimit": 10},
                }
                for acct, ns in accounts.items()
            ]
        )
        clock = SmoothClock(tmp / "clock")
        url = f"sqlite:///{tmp / 'ledger.db'}"
        ledger = open_ledger(url, clock=clock.file)
        for acct in accounts:
            ledger.ensure_account(acct, "CNY")
            ledger.post_entry(acct, EntryKind.RECHARGE, 100_00, f"fund-{acct}", at=clock.file.now())
        settings = chart_config()
        proc = start_operator(
            tmp, kubeconfig, clock.file, url,
            **settings, GPUCLOUD_OPERATOR_NAMESPACES=",".join(namespaces),
        )  # fmt: skip
        pods = PodDeletions(kubeconfig, clock)
        tb.apply([instance(ns, i) for ns in namespaces for i in range(PER_ACCOUNT)])
        total = ACCOUNTS * PER_ACCOUNT
        deadline = time.monotonic() + 300
        while len(pods.running) < total and time.monotonic() < deadline:
            time.sleep(0.5)
        if len(pods.running) < total:
            print(f"# only {len(pods.running)}/{total} pods ran", file=sys.stderr)
            return 1
        # the runs as the oracle sees them: each meter's start, its price per second
        fen = prices()
        runs: dict[str, list[tuple[Fraction, int]]] = {a: [] for a in accounts}
        by_ns = {ns: a for a, ns in accounts.items()}
        deadline = time.monotonic() + 60
        while True:
            items = json.loads(tb.kubectl("get", "gpuinstances", "-A", "-o", "json").stdout)[
                "items"
            ]
            if (
                all((i.get("status") or {}).get("meterSince") for i in items)
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
        for inst in items:
            spec, st = inst["spec"], inst["status"]
            rate = fen[spec["gpu"]["product"]] * spec["gpu"]["count"]
            runs[by_ns[inst["metadata"]["namespace"]]].append((rate, stamp(st["meterSince"])))
        # balances that run out at staggered instants ahead
        base = int(clock.now_s()) + LEAD_S
        due: dict[str, int] = {}
        for k, acct in enumerate(accounts):
            target = base + int(k * STAGGER_S)
            balance = cost(runs[acct], target - 1)
            have = ledger.balance(acct)
            if balance != have:
                ledger.post_entry(
                    acct,
                    EntryKind.ADJUSTMENT,
                    balance - have,
                    f"bench-set-{acct}",
                    at=clock.file.now(),
                    memo="the bench sets the balance to run out at a known instant",
                    meta={"actor": "enforcement-bench"},
                )
            due[acct] = run_out(runs[acct], ledger.balance(acct))
        load_before, cpu_before = os.getloadavg()[0], cpu_s(proc.pid)
        profiler = start_profiler(proc.pid)  # BENCH_PROFILE=<file>: the enforcement phase
        last = max(due.values())
        while len(pods.deleted) < total and clock.now_s() < last + 120:
            time.sleep(0.2)
        cpu_used = cpu_s(proc.pid) - cpu_before
        stop_profiler(profiler)
        problems, lags, account_lag, pass_lag = [], [], [], []
        statuses = {
            a["metadata"]["name"]: a.get("status") or {}
            for a in json.loads(tb.kubectl("get", "accounts", "-o", "json").stdout)["items"]
        }
        for acct, ns in accounts.items():
            since = statuses[acct].get("arrearsSince")
            if since:
                account_lag.append(stamp(since) - due[acct])
            for i in range(PER_ACCOUNT):
                seen = pods.deleted.get((ns, f"i{i}"))
                if seen is None:
                    problems.append(
                        f"{ns}/i{i}: running {last + 120 - due[acct]} s after its account ran out"
                    )
                    continue
                lags.append(seen - due[acct])
                if seen < due[acct]:
                    problems.append(
                        f"{ns}/i{i}: deleted {due[acct] - seen:.1f} s before its account ran out"
                    )
                if since:
                    pass_lag.append(seen - stamp(since))
        pods.close()
        phases = Counter(
            (i.get("status") or {}).get("phase")
            for i in json.loads(tb.kubectl("get", "gpuinstances", "-A", "-o", "json").stdout)[
                "items"
            ]
        )
        print(
            f"# pod events {dict(pods.events)}; instances by phase {dict(phases)}", file=sys.stderr
        )
        print(f"# run-out instants {min(due.values())} .. {last}", file=sys.stderr)
        print(
            f"# load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"operator CPU {cpu_used:.1f} s during enforcement; clock rate {RATE}",
            file=sys.stderr,
        )
        if lags:
            print(f"enforcement_lag_p95_s: {percentile(lags, 95):.1f} s", flush=True)
            print(f"enforcement_lag_max_s: {max(lags):.1f} s", flush=True)
            print(f"# lag p50 {percentile(lags, 50):.1f} s, min {min(lags):.1f} s", file=sys.stderr)
        if account_lag and pass_lag:
            print(
                "# where it goes: run-out -> arrearsSince (the account pass) p50 "
                f"{percentile(account_lag, 50):.1f} s, p95 {percentile(account_lag, 95):.1f} s, "
                f"max {max(account_lag):.1f} s; arrearsSince -> pod deletion (the instance pass) "
                f"p50 {percentile(pass_lag, 50):.1f} s, p95 {percentile(pass_lag, 95):.1f} s, "
                f"max {max(pass_lag):.1f} s",
                file=sys.stderr,
            )
        # settle: past the metering grace, every run's meter settled, then the balances
        clock.jump(int(settings.get("GPUCLOUD_OPERATOR_METERING_GRACE_S", "300")) + 10)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            open_meters = [
                m
                for a in accounts
                for m in ledger.meters(a)
                if m.kind == "gpu_time" and m.settled_at is None
            ]
            if not open_meters:
                break
            time.sleep(1)
        else:
            problems.append(f"{len(open_meters)} GPU meters not settled 180 s after the grace")
        balances = {a: ledger.balance(a) for a in accounts}
        print(f"overdraft_max_minor: {max(0, -min(balances.values()))} fen", flush=True)
        below = sorted(-b for b in balances.values() if b < 0)
        print(f"# {len(below)} of {ACCOUNTS} accounts below zero: {below}", file=sys.stderr)
        ledger.close()
        if problems:
            print("\n".join(f"# {p}" for p in problems[:20]), file=sys.stderr)
            return 1
        return 0
    finally:
        if proc is not None:
            stop_process(proc)
        if clock is not None:
            clock.stop()
        tb.down()


if __name__ == "__main__":
    sys.exit(main())
