"""Chaos: a seeded random schedule of starts, stops, spot preemptions and package expiries
on the file clock, with the operator SIGKILLed at random moments (and left down while the
clock moves on) and restarted; at the end every instance is released and the ledger is
compared, to the fen, with an oracle built from the pods' own records (chaos.py): each
run billed once from its pod's start to its stop, package terms once, storage from the
first start to the release; no double start, no GPU given out twice, no meter left open.

Short by default (one run of GPUCLOUD_CHAOS_STEPS=6 steps); longer with
GPUCLOUD_CHAOS_RUNS=N (seeds GPUCLOUD_CHAOS_SEED, +1, ...) and more steps."""

from __future__ import annotations

import os
import random
import re
import time
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from chaos import PodWatch, run_charge, ts
from opharness import Harness

from gpucloud.billing import to_minor
from gpucloud.testing.kube import get_json
from gpucloud.testing.testbed import Testbed

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("GPUCLOUD_CHAOS_SEED", "21"))
RUNS = int(os.environ.get("GPUCLOUD_CHAOS_RUNS", "1"))
STEPS = int(os.environ.get("GPUCLOUD_CHAOS_STEPS", "6"))

L40S, A100 = "NVIDIA-L40S", "NVIDIA-A100-SXM4-80GB"
# name -> (product, GPUs, billing, price per GPU-hour of the mode); the L40S node has 4
# GPUs, so b (2) starting beside s (3) preempts s
SHAPES: dict[str, tuple[str, int, dict[str, str], Decimal]] = {
    "a": (A100, 1, {"mode": "PayAsYouGo"}, Decimal("9.80")),
    "b": (L40S, 2, {"mode": "PayAsYouGo"}, Decimal("5.20")),
    "s": (L40S, 3, {"mode": "Spot"}, Decimal("2.60")),
    "p": (A100, 1, {"mode": "Package", "period": "Day"}, Decimal("0")),
}
DAY_PACKAGE_MINOR = 210_00  # A100 x1, one day
STORAGE_PER_S = Fraction(Decimal("0.0004")) * 50 / 3600  # 50 GiB quota


class Chaos:
    def __init__(self, h: Harness, seed: int) -> None:
        self.h, self.rng = h, random.Random(seed)
        self.desired = {name: "Running" for name in SHAPES}
        self.promises: dict[str, datetime] = {}  # meter id -> stop instant status promised
        self.kills = 0
        nodes = get_json(h.tb, "nodes")["items"]
        capacity = {
            n["metadata"]["name"]: int(n["status"]["allocatable"].get("nvidia.com/gpu", 0))
            for n in nodes
        }
        self.watch = PodWatch(h.tb, h.ns, h.clock, capacity)

    @property
    def alive(self) -> bool:
        return self.h.proc is not None

    # -- the schedule --------------------------------------------------------------
    def step(self) -> None:
        h, rng = self.h, self.rng
        name = rng.choice(sorted(SHAPES))
        st = h.status(name)
        halted = st.get("phase") in ("Preempted", "Expired", "Stopped")
        if self.desired[name] == "Running" and not halted:
            self.desired[name] = "Stopped"
        elif self.desired[name] == "Running":  # down by itself: a new spec starts it again
            h.patch_spec(name, {"state": "Stopped"})
            self.desired[name] = "Running"
        else:
            self.desired[name] = "Running"
        h.patch_spec(name, {"state": self.desired[name]})
        if self.alive and rng.random() < 0.5:
            time.sleep(rng.uniform(0, 1.5))  # kill -9 wherever the operator is by then
            h.kill()
            self.kills += 1
        self.quiesce()
        dt = 25 * 3600 if rng.random() < 0.12 else rng.randint(20, 700)
        h.advance(dt)
        if not self.alive and rng.random() < 0.7:
            h.start()
        elif self.alive and rng.random() < 0.25:
            time.sleep(rng.uniform(0, 1.0))  # a kill while it acts on the new time
            h.kill()
            self.kills += 1
            h.start()
        self.quiesce()

    # -- waiting until nothing moves until the clock does ----------------------------
    def quiesce(self) -> None:
        self.h.wait(self._settled, "the test bed to settle", timeout=90)

    def _settled(self) -> bool:
        pods = get_json(self.h.tb, "pods", "-n", self.h.ns)["items"]
        if not self.watch.caught_up(pods):
            return False
        by_instance = {p["metadata"]["labels"].get("gpucloud.dev/instance"): p for p in pods}
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                return False
            st = pod.get("status") or {}
            waiting = any(
                c["type"] == "PodScheduled" and c["status"] == "False"
                for c in st.get("conditions") or []
            )
            if st.get("phase") != "Running" and not waiting:
                return False  # on its way
        statuses = {name: self.h.status(name) for name in SHAPES}
        for st in statuses.values():  # what status promised while the run's pod lived
            if st.get("meterId"):
                if st.get("preemptAt"):
                    self.promises[st["meterId"]] = ts(st["preemptAt"])
                if st.get("phase") == "Stopping" and st.get("stoppedAt"):
                    self.promises[st["meterId"]] = ts(st["stoppedAt"])
        if not self.alive:
            return True
        for name, st in statuses.items():
            assert st.get("phase") != "Refused", st
            pod = by_instance.get(name)
            phase = st.get("phase")
            if self.desired[name] == "Stopped" or phase in ("Preempted", "Expired"):
                if pod is not None or phase not in ("Stopped", "Preempted", "Expired"):
                    return False
            elif phase == "Running":
                if pod is None or pod["status"].get("phase") != "Running":
                    return False
            elif phase != "Pending" or pod is None or pod["status"].get("phase") == "Running":
                return False  # Pending with its pod waiting for GPUs is settled
        return True

    def _seen(self) -> bool:
        return self.watch.caught_up(get_json(self.h.tb, "pods", "-n", self.h.ns)["items"])

    # -- the end: release everything, then compare with the oracle --------------------
    def release(self) -> datetime:
        h = self.h
        if not self.alive:
            h.start()
        released = h.clock.now()
        h.tb.kubectl("delete", "gpuinstances", "--all", "-n", h.ns, "--wait=false")

        def begun() -> bool:  # releasedAt set, or released already (nothing to wait for)
            items = get_json(h.tb, "gpuinstances", "-n", h.ns)["items"]
            return all((i.get("status") or {}).get("releasedAt") for i in items)

        h.wait(begun, "the releases to begin")
        h.wait(self._seen, "the watch to see the pods deleted")
        h.advance(61)  # the last runs' metering grace
        h.wait(
            lambda: not get_json(h.tb, "gpuinstances", "-n", h.ns)["items"],
            "every instance released",
            timeout=90,
        )
        return released

    def check(self, released: datetime, uids: dict[str, str]) -> None:
        h, records = self.h, self.watch.records()
        assert not self.watch.overcommits, self.watch.overcommits
        by_uid = {r.uid: r for r in records}
        meters = h.ledger.meters(h.account)
        assert all(m.closed_at is not None and m.settled_at is not None for m in meters)
        entries = h.ledger.entries(h.account, limit=10_000)
        # every run of a metered instance whose pod ran has exactly one meter
        ran = {
            r.uid
            for r in records
            if SHAPES[r.instance][2]["mode"] != "Package"
            and r.start is not None
            and (r.deleted is None or r.deleted > r.start)
        }
        problems = [
            f"{by_uid[u].instance} run {by_uid[u].run}: no meter"
            for u in ran - {m.subject for m in meters}
        ]
        for m in meters:
            rec = by_uid[m.subject]
            assert rec.start is not None and rec.deleted is not None
            end = min(rec.deleted, self.promises.get(m.meter_id, rec.deleted))
            seconds = int((end - rec.start).total_seconds())
            _, gpus, _, price = SHAPES[rec.instance]
            want = run_charge(price, gpus, seconds)
            keys = (f"meter:{m.meter_id}:", f"meter-fallback:{m.meter_id}")
            got = -sum(e.amount_minor for e in entries if e.key.startswith(keys))
            if (got, m.opened_at, m.closed_at) != (want, rec.start, end):
                problems.append(
                    f"{rec.instance} run {rec.run}: billed {got} for {m.opened_at}->"
                    f"{m.closed_at}, oracle {want} for {rec.start}->{end}"
                )
        # package terms, as the ledger charged them (memo "term N <start> -> <end>"),
        # checked against the runs: each starts when a run started, none overlap, every
        # run that held its GPUs for a second or more is inside one. (A run that ran for
        # no second of the clock may or may not have bought one: a race, either is fair.)
        charged = [e for e in entries if e.key.startswith("package:")]
        terms = sorted(
            (ts(m[1]), ts(m[2]))
            for m in (re.search(r"term \d+ (\S+) -> (\S+)", e.memo) for e in charged)
            if m
        )
        p_runs = [r for r in records if r.instance == "p" and r.start is not None]
        if -sum(e.amount_minor for e in charged) != DAY_PACKAGE_MINOR * len(terms):
            problems.append(f"package terms {terms}: not {DAY_PACKAGE_MINOR} each")
        for (a, b), nxt in zip(terms, [*terms[1:], None], strict=True):
            if b - a != timedelta(days=1) or (nxt is not None and nxt[0] < b):
                problems.append(f"package term {a} -> {b} overlaps the next or is not a day")
            if not any(r.start == a for r in p_runs):
                problems.append(f"package term from {a}: no run started then")
        for r in p_runs:
            held = r.deleted is None or r.deleted > r.start
            if held and not any(a <= r.start < b for a, b in terms):
                problems.append(f"p run {r.run} from {r.start}: in no paid term")
        # storage: from the first start to the release, less the paid package terms
        for name in SHAPES:
            starts = [r.start for r in records if r.instance == name and r.start is not None]
            seconds = 0
            if starts:
                seconds = int((released - min(starts)).total_seconds())
                if name == "p":
                    paid = [(a, min(b, released)) for a, b in terms if a < released]
                    seconds -= sum(int((b - a).total_seconds()) for a, b in paid)
            want = to_minor(STORAGE_PER_S * seconds)
            got = -sum(
                e.amount_minor for e in entries if e.key.startswith(f"storage:{uids[name]}:")
            )
            if got != want:
                problems.append(f"{name} storage billed {got}, oracle {want} ({seconds} s)")
        timeline = [
            f"  {r.instance} run {r.run} {r.uid[:8]}: created {r.created}, placed {r.placed} "
            f"(waited: {r.unscheduled}), delay {r.delay}, start {r.start}, deleted {r.deleted}"
            for r in sorted(records, key=lambda r: (r.instance, r.run))
        ] + [
            f"  meter {m.meter_id} {m.subject[:8]}: {m.opened_at} -> {m.closed_at}" for m in meters
        ]
        assert not problems, "\n".join([*problems, "timeline:", *timeline])


@pytest.mark.parametrize("run", range(RUNS))
def test_chaos_kill_9_bills_every_gpu_second_once(
    testbed: Testbed, namespace: str, tmp_path: Path, run: int
) -> None:
    h = Harness(testbed, namespace, tmp_path)
    h.setup(instance_limit=10)
    chaos = Chaos(h, SEED + run)
    try:
        h.fund(100_000_00)
        chaos.watch.start()
        h.start()
        uids: dict[str, Any] = {}
        for name, (product, gpus, billing, _) in SHAPES.items():
            h.instance(name, product, gpus, **billing)
            uids[name] = h.get(name)["metadata"]["uid"]
        chaos.quiesce()
        for _ in range(STEPS):
            chaos.step()
        released = chaos.release()
        h.wait(
            lambda: all(r.deleted for r in chaos.watch.records()), "the watch to see the pods go"
        )
        chaos.check(released, uids)
        print(f"chaos seed {SEED + run}: {STEPS} steps, {chaos.kills} kill -9")
    finally:
        chaos.watch.stop()
        h.close()
