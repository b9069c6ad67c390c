"""Operator at scale: 2,000 GPUInstances of 20 accounts over 500 fake GPU nodes (8 GPUs
each), all Running, then idle, then every bill checked.

The operator runs on a file clock held still while the instances start, so every run's
billing starts at the same instant T0. Once all are Running (``operator_scale_instances_
running_s``, from the first create), the operator is left ticking with nothing changing
(its periodic passes at the chart's interval) for BENCH_IDLE_S (60) seconds:
``operator_idle_cpu_percent`` is its CPU over that window (100 = one core) and
``operator_scale_rss_mib`` its RSS at the end. Then the clock moves on to T1 (1 h 23 min
17 s later: a storage hour is settled on the way), every instance is stopped, the clock
moves past the metering grace period, and every instance's ledger charges are compared
with an oracle computed here from the price book: one GPU run from T0 to T1 (price x GPUs
x seconds, rounded once) and one hour of its storage quota.
``operator_scale_misbilled`` counts the instances billed otherwise; the bench exits 1
when one is, or when not all ran. BENCH_SCALE_INSTANCES / BENCH_SCALE_NODES shrink it
(e.g. 100 / 25 for a try). Runs its own test bed cluster (GPUCLOUD_TESTBED_NAME, default
``gpucloud-opscale``) and deletes it afterwards; BENCH_PROFILE=<file> records the
operator's idle window with py-spy; BENCH_IDLE_S its length (60 s);
BENCH_MALLOC_ARENA_MAX the operator's malloc arenas (2, as its image; ``default``: glibc's);
BENCH_IDLE_CLOCK_RATE: clock seconds per real second during the idle window (0: held
still; 1: real time, so every cost refresh finds a new accruedCost to patch, as in a
cluster).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from operator_bench import (
    PhaseWatch,
    cpu_s,
    rss_mib,
    shape,
    start_operator,
    start_profiler,
    stop_process,
    stop_profiler,
)

from gpucloud.billing import to_minor
from gpucloud.clock import FileClock
from gpucloud.kube_names import GROUP, VERSION
from gpucloud.ledger import EntryKind, Ledger, open_ledger
from gpucloud.testing.kube import install_crds
from gpucloud.testing.testbed import REPO, Binaries, Testbed, parse_node_mix

INSTANCES = int(os.environ.get("BENCH_SCALE_INSTANCES", "2000"))
NODES = int(os.environ.get("BENCH_SCALE_NODES", "500"))
ACCOUNTS = 20
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "60"))
IDLE_CLOCK_RATE = float(os.environ.get("BENCH_IDLE_CLOCK_RATE", "0"))
TICK_S = "10"  # the chart's operator.config.tick_interval_s
QUOTA_GI = 20
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # on the hour: storage hours are clock hours
T1 = T0 + timedelta(hours=1, minutes=23, seconds=17)
GRACE_S = 300  # the operator's metering_grace_s (its default)


def namespace(i: int) -> str:
    return f"scale-{i % ACCOUNTS:02d}"


def instance(i: int) -> dict[str, Any]:
    product, count = shape(i)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUInstance",
        "metadata": {"name": f"i{i:04d}", "namespace": namespace(i)},
        "spec": {
            "gpu": {"product": product, "count": count},
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": QUOTA_GI},
        },
    }


def prices() -> tuple[dict[str, Fraction], Fraction]:
    """Pay-as-you-go price per GPU-hour by product and storage per GiB-hour, read from
    the price book the bench installs (the oracle's only input from the product)."""
    book = yaml.safe_load((REPO / "examples" / "pricebook.yaml").read_text())["spec"]
    gpu = {g["product"]: Fraction(Decimal(g["payAsYouGoPerHour"])) for g in book["gpus"]}
    return gpu, Fraction(Decimal(book["storage"]["instancePerGBHour"]))


def oracle(i: int) -> tuple[int, int]:
    """Instance ``i``'s bill: its one GPU run T0 -> T1 and its first storage hour, each
    rounded once to the fen."""
    gpu, storage = prices()
    product, count = shape(i)
    seconds = int((T1 - T0).total_seconds())
    return to_minor(gpu[product] * count * seconds / 3600), to_minor(storage * QUOTA_GI)


def gpu_meters(ledger: Ledger) -> list[Any]:
    return [m for m in ledger.meters() if m.kind == "gpu_time"]


def misbilled(ledger: Ledger) -> list[str]:
    """Every instance's charges against the oracle: GPU (the run's meter entries) and
    storage (the rest), and the meter itself opened at T0, closed at T1, settled."""
    problems: list[str] = []
    meters = {m.resource: m for m in gpu_meters(ledger)}
    by_account: dict[str, list[Any]] = {}
    for a in range(ACCOUNTS):
        by_account[f"scale-{a:02d}"] = ledger.entries(f"scale-{a:02d}", limit=10_000)
    for i in range(INSTANCES):
        resource = f"{namespace(i)}/i{i:04d}"
        entries = [
            e
            for e in by_account[namespace(i)]
            if e.resource == resource and e.kind != EntryKind.RECHARGE
        ]
        gpu = -sum(e.amount_minor for e in entries if e.key.startswith("meter"))
        storage = -sum(e.amount_minor for e in entries if not e.key.startswith("meter"))
        m = meters.get(resource)
        got = (gpu, storage, m and m.opened_at, m and m.closed_at, bool(m and m.settled_at))
        want = (*oracle(i), T0, T1, True)
        if got != want:
            problems.append(f"{resource}: billed {got}, oracle {want}")
    return problems


def wait_for(what: str, done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            print(f"# timed out waiting for {what}", file=sys.stderr)
            return False
        time.sleep(1)
    return True


def main() -> int:
    name = os.environ.get("GPUCLOUD_TESTBED_NAME", "gpucloud-opscale")
    tmp = Path(tempfile.mkdtemp(prefix="opscale-"))
    kubeconfig = Path(os.environ.get("GPUCLOUD_TESTBED_KUBECONFIG", tmp / "kubeconfig"))
    half = NODES // 2
    mix = f"NVIDIA-L40S:{NODES - half}:8,NVIDIA-A100-SXM4-80GB:{half}:8"
    tb = Testbed(
        name=name, kubeconfig=kubeconfig, binaries=Binaries.from_cache(), controller_qps=100
    )
    proc = None
    try:
        t = time.monotonic()
        tb.up(nodes=parse_node_mix(mix), timeout=600)
        print(f"# cluster with {NODES} nodes up in {time.monotonic() - t:.0f} s", file=sys.stderr)
        install_crds(tb)
        tb.kubectl("apply", "-f", str(REPO / "examples" / "pricebook.yaml"))
        clock = FileClock(tmp / "clock")
        clock.set(T0)
        url = f"sqlite:///{tmp / 'ledger.db'}"
        ledger = open_ledger(url, clock=clock)
        docs: list[dict[str, Any]] = []
        for a in range(ACCOUNTS):
            ns = f"scale-{a:02d}"
            docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            docs.append(
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Account",
                    "metadata": {"name": ns},
                    "spec": {"namespaces": [ns], "instanceLimit": 10000},
                }
            )
            ledger.ensure_account(ns, "CNY")
            ledger.post_entry(ns, EntryKind.RECHARGE, 10**9, f"fund-{ns}", at=T0)
        tb.apply(docs)
        # as the operator's image sets it (Dockerfile); BENCH_MALLOC_ARENA_MAX=default for
        # glibc's own (8 arenas per core)
        arenas = os.environ.get("BENCH_MALLOC_ARENA_MAX", "2")
        malloc = {} if arenas == "default" else {"MALLOC_ARENA_MAX": arenas}
        proc = start_operator(
            tmp, kubeconfig, clock, url, GPUCLOUD_OPERATOR_TICK_INTERVAL_S=TICK_S, **malloc
        )
        kubernetes.config.load_kube_config(str(kubeconfig))
        api = kubernetes.client.CustomObjectsApi()
        watch = PhaseWatch(tb, namespace=None)
        time.sleep(3)  # the operator lists and watches; the bench's watch is open
        load = os.getloadavg()
        print(f"# load average before the burst {load[0]:.2f} {load[1]:.2f}", file=sys.stderr)
        t0 = watch.t0 = time.monotonic()

        def create(i: int) -> None:
            body = instance(i)
            ns = body["metadata"]["namespace"]
            api.create_namespaced_custom_object(GROUP, VERSION, ns, "gpuinstances", body)

        with ThreadPoolExecutor(4) as pool:  # a few tenants at once
            list(pool.map(create, range(INSTANCES)))
        created = time.monotonic() - t0
        peak = rss_mib(proc.pid)

        def all_running() -> bool:
            nonlocal peak
            peak = max(peak, rss_mib(proc.pid))
            return len(watch.running) >= INSTANCES

        ran = wait_for("every instance Running", all_running, timeout=1500)
        all_running_s = time.monotonic() - t0
        print(f"# created in {created:.0f} s; {len(watch.running)} Running", file=sys.stderr)
        print(f"operator_scale_instances_running_s: {all_running_s:.0f}", flush=True)
        if not ran:
            return 1
        time.sleep(2 * float(TICK_S))  # the last starts' events and first ticks pass
        load = os.getloadavg()
        profiler = start_profiler(proc.pid)
        cpu0, w0 = cpu_s(proc.pid), time.monotonic()
        idle_clock(clock, IDLE_CLOCK_RATE, IDLE_S)
        cpu = (cpu_s(proc.pid) - cpu0) / (time.monotonic() - w0) * 100
        rss = rss_mib(proc.pid)
        print(f"# {memory_split(proc.pid)}", file=sys.stderr)
        stop_profiler(profiler)
        print(
            f"# load average before the idle window {load[0]:.2f} {load[1]:.2f}; "
            f"peak RSS during the starts {peak:.0f} MiB",
            file=sys.stderr,
        )
        print(f"operator_scale_rss_mib: {rss:.0f}")
        print(f"operator_idle_cpu_percent: {cpu:.1f}", flush=True)

        clock.set(T1)
        t = time.monotonic()

        def stop(i: int) -> None:
            body = {"spec": {"state": "Stopped"}}
            ns = namespace(i)
            api.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "gpuinstances", f"i{i:04d}", body
            )

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(stop, range(INSTANCES)))
        stopped = wait_for(
            "every instance Stopped", lambda: watch.count("Stopped") >= INSTANCES, 900
        )
        print(f"# all stopped in {time.monotonic() - t:.0f} s", file=sys.stderr)
        clock.set(T1 + timedelta(seconds=GRACE_S + 1))  # the runs settle on the next ticks

        def settled() -> bool:
            meters = gpu_meters(ledger)
            return len(meters) >= INSTANCES and all(m.settled_at for m in meters)

        wait_for("every run settled", settled, 300)
        watch.close()
        problems = misbilled(ledger)
        print(f"operator_scale_misbilled: {len(problems)}")
        for line in problems[:20]:
            print(f"#   {line}", file=sys.stderr)
        return 0 if stopped and not problems else 1
    finally:
        if proc is not None:
            stop_process(proc)
        tb.down()


def idle_clock(clock: FileClock, rate: float, seconds: float) -> None:
    """Wait out the idle window; with a rate, move the clock from T0 at that rate meanwhile
    (T1 stays ahead of it: the window is minutes, T1 - T0 over an hour)."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        if rate:
            clock.set(T0 + timedelta(seconds=elapsed * rate))
        time.sleep(0.1 if rate else seconds - elapsed)


def memory_split(pid: int) -> str:
    """Where the RSS is (``/proc/<pid>/smaps_rollup``): anonymous memory (the heap:
    Python objects, the extensions' own, what malloc keeps) against file-backed pages
    (the interpreter, shared libraries, mapped files); and the thread count."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0]) / 1024
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    return (
        f"smaps_rollup: Rss {fields.get('Rss', 0):.0f} MiB, Anonymous "
        f"{fields.get('Anonymous', 0):.0f} MiB, file-backed "
        f"{fields.get('Rss', 0) - fields.get('Anonymous', 0):.0f} MiB; {threads} threads"
    )


if __name__ == "__main__":
    sys.exit(main())
