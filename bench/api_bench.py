"""Benchmark of the metering API over HTTP on loopback.

Simulates 100 nodes x 8 GPUs shipping usage records of 10 s windows through
concurrent clients to a real ``gpucloud-api`` process, on SQLite and on PostgreSQL.
Each request carries one node's records for ``--batch-windows`` consecutive windows
(an agent catching up from its write-ahead log). Prints exactly::

    ingest_gpu_seconds_per_s_sqlite: N
    ingest_gpu_seconds_per_s_postgres: N        (or ..._postgres_durable with --pg-durable)
    usage_to_balance_p95_s: N

Each backend's CPU time per record (the API process; PostgreSQL's server too) and the
batches per transaction (group commit) go to stderr: figures that vary less with the
machine's load than the rates do. ``usage_to_balance`` is measured with probe batches
sent while the load runs: the time from the API acknowledging a probe to its charge
being visible in the balance. The figure printed is the worse (higher) p95 of the two
backends. Details go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import httpx

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.billing.money import to_minor
from gpucloud.ledger import open_ledger
from gpucloud.testing.postgres import postgres_server

PRICE = Decimal("9.80")
WINDOW_S = 10
GPUS = 8
ROOT = Path(__file__).resolve().parents[1]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time (user + system) of a process, with that of its exited children and, with
    ``children``, of its live children (PostgreSQL's backends). 0 where /proc has none."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        f = _stat(pid)
    except OSError:
        return 0.0
    total = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    if children:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    c = _stat(int(entry))
                except OSError:
                    continue
                if int(c[1]) == pid:
                    total += int(c[11]) + int(c[12])
    return total / tick


def postmaster_pid(db_url: str) -> int | None:
    """The bench's PostgreSQL server (by its port), for its CPU time."""
    port = db_url.rsplit(":", 1)[1].split("/")[0]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"postgres") and b"-p" in argv and port.encode() in argv:
            return int(entry)
    return None


def record(node: str, gpu: int, start: int) -> dict:
    return {
        "kind": "gpu_time",
        "node": node,
        "start": start,
        "end": start + WINDOW_S,
        "quantity": WINDOW_S,
        "gpu": {"uuid": f"GPU-{node}-{gpu}", "product": "NVIDIA-A100-SXM4-80GB"},
        "pod": {"namespace": "bench", "name": f"inst-{node}", "uid": f"pod-{node}"},
    }


def make_batches(
    nodes: list[str], windows: int, batch_windows: int, t0: int
) -> list[tuple[str, bytes, int]]:
    """(node, encoded body, GPU-seconds) for every request, interleaved across nodes."""
    out = []
    for first in range(0, windows, batch_windows):
        for node in nodes:
            recs = [
                record(node, g, t0 + WINDOW_S * w)
                for w in range(first, min(first + batch_windows, windows))
                for g in range(GPUS)
            ]
            out.append((node, json.dumps({"records": recs}).encode(), WINDOW_S * len(recs)))
    return out


def run_backend(name: str, db_url: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    nodes = [f"node-{i:03d}" for i in range(args.nodes)]
    t0 = int((datetime.now(UTC) - timedelta(days=2)).timestamp())
    lg = open_ledger(db_url)
    lg.ensure_account("bench")
    lg.ensure_account("probe")
    opened = datetime.fromtimestamp(t0 - 60, UTC)
    for node in [*nodes, "probe-node"]:
        lg.open_meter(
            f"m-{node}", account="probe" if node == "probe-node" else "bench",
            resource=f"bench/{node}", kind="gpu_time", subject=f"pod-{node}",
            unit_price=PRICE, unit="gpu_hour", opened_at=opened, gpus=GPUS, node=node,
        )  # fmt: skip
    lg.close()
    batches = make_batches(nodes, args.windows, args.batch_windows, t0)
    total_gpu_s = sum(b[2] for b in batches)
    work_dir = ROOT / ".bench" / name
    with ApiProcess(work_dir, db_url, nodes=[*nodes, "probe-node"]) as api:
        latencies: list[float] = []
        load_done = threading.Event()
        probe = threading.Thread(target=probe_loop, args=(api, t0, load_done, latencies, args))
        probe.start()
        pm = postmaster_pid(db_url) if name == "postgres" else None
        assert api.proc is not None
        cpu0 = cpu_seconds(api.proc.pid), cpu_seconds(pm, children=True) if pm else 0.0
        start = time.perf_counter()
        sent = send_all(api, batches, args.clients)
        elapsed = time.perf_counter() - start
        cpu1 = cpu_seconds(api.proc.pid), cpu_seconds(pm, children=True) if pm else 0.0
        load_done.set()
        probe.join()
        rate = sent / elapsed
        log(f"[{name}] {len(batches)} requests, {sent} GPU-seconds in {elapsed:.2f} s "
            f"({args.clients} clients, {args.batch_windows * GPUS} records/request)")  # fmt: skip
        n_records = total_gpu_s // WINDOW_S
        api_us, db_us = (1e6 * (b - a) / n_records for a, b in zip(cpu0, cpu1, strict=True))
        log(f"[{name}] CPU per record: API process {api_us:.1f} us"
            + (f", PostgreSQL server {db_us:.1f} us" if pm else "")
            + f" (load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        log_stages(api, name, elapsed)
        check_exact(api, name, total_gpu_s, nodes)
    return rate, latencies


def send_all(api: ApiProcess, batches: list[tuple[str, bytes, int]], clients: int) -> int:
    accepted = [0] * clients

    def worker(k: int) -> None:
        with httpx.Client(base_url=api.url, timeout=120) as c:
            for node, body, gpu_s in batches[k::clients]:
                resp = c.post(
                    "/v1/usage",
                    content=body,
                    headers={"Authorization": f"Bearer {agent_token(node)}",
                             "Content-Type": "application/json"},
                )  # fmt: skip
                if resp.status_code != 200:
                    raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
                accepted[k] += gpu_s

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(accepted)


def probe_loop(
    api: ApiProcess,
    t0: int,
    load_done: threading.Event,
    latencies: list[float],
    args: argparse.Namespace,
) -> None:
    """One probe batch (8 GPUs x 1 window) at a time; time from ack to visible charge."""
    headers = {"Authorization": f"Bearer {agent_token('probe-node')}"}
    admin = {"Authorization": "Bearer admin-token"}
    gpu_s = 0
    with httpx.Client(base_url=api.url, timeout=120) as c:
        w = 0
        while not load_done.is_set() or len(latencies) < args.min_probes:
            body = {"records": [record("probe-node", g, t0 + WINDOW_S * w) for g in range(GPUS)]}
            w += 1
            gpu_s += GPUS * WINDOW_S
            want = -to_minor(Fraction(gpu_s) * Fraction(PRICE) / 3600)
            resp = c.post("/v1/usage", json=body, headers=headers)
            acked = time.perf_counter()
            assert resp.status_code == 200, resp.text
            while True:
                bal = c.get("/v1/accounts/probe/balance", headers=admin).json()["balance_minor"]
                if bal == want:
                    latencies.append(time.perf_counter() - acked)
                    break
                if time.perf_counter() - acked > 60:
                    raise RuntimeError(f"probe charge not visible after 60 s ({bal} != {want})")
                time.sleep(0.01)
            time.sleep(args.probe_interval)


def log_stages(api: ApiProcess, name: str, elapsed: float) -> None:
    """Where the API process spent its time, from its own stage histogram."""
    text = httpx.get(f"{api.ops_url}/metrics", timeout=30).text
    sums = {}
    for line in text.splitlines():
        if line.startswith("gpucloud_api_stage_seconds_sum"):
            stage = line.split('stage="')[1].split('"')[0]
            sums[stage] = float(line.rsplit(" ", 1)[1])
    parts = ", ".join(f"{k} {v:.2f} s ({100 * v / elapsed:.0f}%)" for k, v in sorted(sums.items()))
    log(f"[{name}] API time by stage over {elapsed:.2f} s of load: {parts}")
    group = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpucloud_api_ingest_group_batches_")
    }
    commits = group.get("gpucloud_api_ingest_group_batches_count", 0.0)
    if commits:
        batches = group["gpucloud_api_ingest_group_batches_sum"]
        log(f"[{name}] {batches:.0f} batches in {commits:.0f} transactions (group commit)")


def check_exact(api: ApiProcess, name: str, total_gpu_s: int, nodes: list[str]) -> None:
    """After the load: every GPU-second counted once, and the balance exact."""
    admin = {"Authorization": "Bearer admin-token"}
    per_node = total_gpu_s // len(nodes)
    want = -sum(to_minor(Fraction(per_node) * Fraction(PRICE) / 3600) for _ in nodes)
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=api.url, timeout=60) as c:
        while True:
            bal = c.get("/v1/accounts/bench/balance", headers=admin).json()["balance_minor"]
            if bal == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        rows = c.get("/v1/accounts/bench/usage", headers=admin).json()["rows"]
    counted = sum(r["gpu_seconds"] for r in rows)
    log(
        f"[{name}] exactness: gpu_seconds {counted} (sent {total_gpu_s}), "
        f"balance {bal} (want {want})"
    )
    if counted != total_gpu_s or bal != want:
        raise SystemExit(f"[{name}] NOT EXACT")


def p95(values: list[float]) -> float:
    return (
        statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--windows", type=int, default=120, help="10 s windows per node in all")
    p.add_argument("--batch-windows", type=int, default=60, help="windows per request")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--min-probes", type=int, default=20)
    p.add_argument("--probe-interval", type=float, default=0.1)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument(
        "--pg-durable",
        action="store_true",
        help="PostgreSQL with fsync on, as in production (default: the test server's fsync off)",
    )
    args = p.parse_args(argv)
    results: dict[str, float] = {}
    p95s: list[float] = []
    for backend in args.backends.split(","):
        if backend == "sqlite":
            db = ROOT / ".bench" / "sqlite" / "ledger.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            rate, lat = run_backend("sqlite", f"sqlite:///{db}", args)
        else:
            with postgres_server(durable=args.pg_durable) as url:
                rate, lat = run_backend("postgres", url, args)
        results[backend] = rate
        p95s.append(p95(lat))
        log(f"[{backend}] usage_to_balance: n={len(lat)} median={statistics.median(lat):.3f} s "
            f"p95={p95(lat):.3f} s max={max(lat):.3f} s")  # fmt: skip
    for backend in ("sqlite", "postgres"):
        if backend in results:
            name = f"{backend}_durable" if backend == "postgres" and args.pg_durable else backend
            print(f"ingest_gpu_seconds_per_s_{name}: {results[backend]:.0f}")
    print(f"usage_to_balance_p95_s: {max(p95s):.3f}")


if __name__ == "__main__":
    main()
