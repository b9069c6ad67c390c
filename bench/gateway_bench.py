"""Gateway overhead and throughput on loopback.

Starts a fake model server and the gateway (caller authentication, metering and the
usage queue and the ledger on, as in production, with a SQLite ledger) as real processes, then:

* overhead: sequential requests, alternating a direct call to the model server and the
  same call through the gateway; overhead pN = pN(through gateway) - pN(direct);
* throughput: 64 concurrent clients (in 2 client processes), alternating windows
  direct to the model server and through the gateway (``--rounds`` of each, the same
  clients), so both see the same machine load; ``gateway_throughput_ratio`` is the
  median over rounds of gateway_rps / direct_rps of the same round. The CPU time the
  gateway (with its drain process) and the model server burn per request (from /proc)
  is reported too: it does not depend on how busy the machine is, unlike the rates.

Prints ``gateway_overhead_p50_ms``, ``gateway_overhead_p99_ms``, ``direct_rps``,
``gateway_rps``, ``gateway_throughput_ratio`` (goals: p99 overhead <= 1 ms, ratio >= 0.5)
and ``*_cpu_us_per_request``. ``--profile FILE`` records the gateway with py-spy during
its throughput windows. Usage: ``.venv/bin/python bench/gateway_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import yaml

from gpucloud.testing.net import free_port

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
PRICEBOOK = {
    "kind": "PriceBook",
    "spec": {
        "currency": "CNY",
        "gpus": [{"product": "NVIDIA-A100-SXM4-80GB", "payAsYouGoPerHour": "9.80"}],
        "storage": {
            "instancePerGBHour": "0.0004",
            "cloudDiskPerGBHour": "0.0003",
            "imagePerGBHour": "0.0002",
        },
        "models": {
            "per1KTokens": "0.0020",
            "perImage": "0.0800",
            "perVideo": "1.2000",
            "personalPerRequestSecond": "0.0030",
        },
    },
}


def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# The caller authenticates (a static token: the check itself is cached, as TokenReview's).
TOKEN = "bench-caller-token"
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
PAYLOAD = json.dumps(BODY).encode()


async def _timed(session: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=PAYLOAD, headers=HEADERS) as r:
        await r.read()
        assert r.status == 200, r.status
    return (time.perf_counter() - t0) * 1000


def overhead(direct: str, gateway: str, n: int) -> tuple[float, float, float, float]:
    """Sequential requests, alternating direct and through the gateway (same client)."""

    async def run() -> tuple[list[float], list[float]]:
        d: list[float] = []
        g: list[float] = []
        async with aiohttp.ClientSession() as session:
            for i in range(n + 200):
                dt, gt = await _timed(session, direct), await _timed(session, gateway)
                if i >= 200:  # warm-up
                    d.append(dt)
                    g.append(gt)
        return d, g

    d, g = asyncio.run(run())
    return percentile(d, 0.5), percentile(d, 0.99), percentile(g, 0.5), percentile(g, 0.99)


def _load(url: str, conc: int, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def worker(session: aiohttp.ClientSession, stop: float) -> int:
        done = 0
        while time.perf_counter() < stop:
            await _timed(session, url)
            done += 1
        return done

    async def main() -> int:
        connector = aiohttp.TCPConnector(limit=conc)
        async with aiohttp.ClientSession(connector=connector) as session:
            stop = time.perf_counter() + seconds
            return sum(await asyncio.gather(*[worker(session, stop) for _ in range(conc)]))

    out.put(asyncio.run(main()))


def throughput(url: str, clients: int, seconds: float, procs: int = 2) -> float:
    """``clients`` concurrent clients (in ``procs`` processes) for ``seconds``."""
    q: multiprocessing.Queue[int] = multiprocessing.Queue()
    ps = [
        multiprocessing.Process(target=_load, args=(url, clients // procs, seconds, q))
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads) so far (Linux)."""
    stat = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """CPU time so far of the running child processes of ``pid`` (the gateway's drain)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # exited meanwhile
                total += cpu_seconds(int(child))
    return total


def measured(url: str, pid: int, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """Requests per second, and the CPU microseconds spent per request by process
    ``pid`` and its child processes, by its main thread (the event loop) alone, and by
    its child processes alone."""
    cpu, main_cpu, kids = cpu_seconds(pid), cpu_seconds(pid, pid), children_cpu_seconds(pid)
    rps = throughput(url, args.clients, args.seconds)
    n = max(1.0, rps * args.seconds)
    kids_us = (children_cpu_seconds(pid) - kids) * 1e6 / n
    return (
        rps,
        (cpu_seconds(pid) - cpu) * 1e6 / n + kids_us,
        (cpu_seconds(pid, pid) - main_cpu) * 1e6 / n,
        kids_us,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="sequential requests per path")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="direct/gateway throughput pairs")
    ap.add_argument(
        "--profile",
        type=Path,
        help="py-spy profile of the gateway: .svg flame graph, else collapsed stacks",
    )
    ap.add_argument("--no-billing", action="store_true", help="metering without billing")
    ap.add_argument("--fsync", action="store_true", help="sync every queue commit to disk")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port_file = tmp / "model.port"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpucloud_gateway.fake_model_server",
                    "--port-file",
                    str(port_file),
                ],
                start_new_session=True,
            )
        )
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        direct = f"http://127.0.0.1:{port_file.read_text()}"
        wait_up(direct)
        (tmp / "endpoints.json").write_text(json.dumps({"bench/llm": [direct]}))
        (tmp / "pricebook.yaml").write_text(yaml.safe_dump(PRICEBOOK))
        from gpucloud.ledger import open_ledger

        ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}")
        from datetime import UTC, datetime

        from gpucloud.ledger import EntryKind

        ledger.ensure_account("bench")
        ledger.ensure_account("caller")  # pays: it needs a balance
        ledger.post_entry("caller", EntryKind.RECHARGE, 10**9, "seed:caller", at=datetime.now(UTC))
        ledger.close()
        config = {
            "models": [
                {
                    "namespace": "bench",
                    "name": "llm",
                    "account": "bench",
                    "visibility": "Public",
                    "publisher": "Official",
                    "task": "TextGeneration",
                }
            ],
            "endpoints": {"kind": "file", "path": "endpoints.json"},
            "auth": {
                "kind": "static",
                "tokens": {TOKEN: "system:serviceaccount:callers:default"},
            },
            "accounts": {"caller": ["callers"]},
        }
        if not args.no_billing:
            config["billing"] = {
                "queue": "usage-queue.db",
                "pricebook": "pricebook.yaml",
                "ledger": f"sqlite:///{tmp / 'ledger.db'}",
            }
            if args.fsync:
                config["billing"]["fsync"] = True
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        gport = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpucloud_gateway.main",
                    "--config",
                    str(tmp / "gateway.yaml"),
                    "--port",
                    str(gport),
                    "--ops-port",
                    str(free_port()),
                ],
                start_new_session=True,
            )
        )
        gateway = f"http://127.0.0.1:{gport}"
        wait_up(gateway)
        d50, d99, g50, g99 = overhead(direct, gateway + "/bench/llm", args.n)
        server_pid, gateway_pid = procs[0].pid, procs[1].pid
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(gateway_pid),
                 "-r", "250", "-o", str(args.profile), "--nonblocking",
                 "-f", "flamegraph" if args.profile.suffix == ".svg" else "raw"],
            )  # fmt: skip
            os.kill(spy.pid, signal.SIGSTOP)  # recording only while the gateway is loaded
        rounds = []
        for _ in range(args.rounds):
            d_rps, d_cpu, _, _ = measured(direct, server_pid, args)
            if spy is not None:
                os.kill(spy.pid, signal.SIGCONT)
            g_cpu0 = cpu_seconds(server_pid)
            g_rps, g_cpu, g_loop, g_drain = measured(gateway + "/bench/llm", gateway_pid, args)
            if spy is not None:
                os.kill(spy.pid, signal.SIGSTOP)
            s_cpu = (cpu_seconds(server_pid) - g_cpu0) * 1e6 / max(1.0, g_rps * args.seconds)
            rounds.append((d_rps, g_rps, g_rps / d_rps, d_cpu, g_cpu, s_cpu, g_loop, g_drain))
            print(
                f"round: direct {d_rps:.0f}/s, gateway {g_rps:.0f}/s, ratio {g_rps / d_rps:.3f}; "
                f"CPU per request: server {d_cpu:.0f} us direct, {s_cpu:.0f} us behind the "
                f"gateway, gateway {g_cpu:.0f} us ({g_loop:.0f} us in its event loop's thread, "
                f"{g_drain:.0f} us in its drain process)",
                flush=True,
            )
        if spy is not None:
            os.kill(spy.pid, signal.SIGCONT)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        rounds.sort(key=lambda r: r[2])
        direct_rps, rps, ratio, d_cpu, g_cpu, s_cpu, g_loop, g_drain = rounds[len(rounds) // 2]
        print(f"direct_p50_ms: {d50:.3f}")
        print(f"direct_p99_ms: {d99:.3f}")
        print(f"gateway_p50_ms: {g50:.3f}")
        print(f"gateway_p99_ms: {g99:.3f}")
        print(f"gateway_overhead_p50_ms: {g50 - d50:.3f}")
        print(f"gateway_overhead_p99_ms: {g99 - d99:.3f}")
        print(f"direct_rps: {direct_rps:.0f}")
        print(f"gateway_rps: {rps:.0f}")
        print(f"gateway_throughput_ratio: {ratio:.3f}")
        print(f"server_cpu_us_per_request: {d_cpu:.0f}")
        print(f"gateway_cpu_us_per_request: {g_cpu:.0f}")
        print(f"gateway_loop_cpu_us_per_request: {g_loop:.0f}")
        print(f"gateway_drain_cpu_us_per_request: {g_drain:.0f}")
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
