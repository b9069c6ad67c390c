"""Gateway overhead and throughput on loopback.

Starts a fake model server and the gateway (caller authentication, metering and the
usage queue and the ledger on, as in production, with a SQLite ledger) as real processes, then:

* overhead: sequential requests, alternating a direct call to the model server and the
  same call through the gateway; overhead pN = pN(through gateway) - pN(direct);
* throughput: 64 concurrent clients (in 2 client processes) through the gateway.

Prints ``gateway_overhead_p50_ms``, ``gateway_overhead_p99_ms`` and ``gateway_rps``
(goal: p99 overhead < 5 ms). Usage: ``.venv/bin/python bench/gateway_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="sequential requests per path")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
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
        direct_rps = throughput(direct, args.clients, args.seconds)
        rps = throughput(gateway + "/bench/llm", args.clients, args.seconds)
        print(f"direct_p50_ms: {d50:.3f}")
        print(f"direct_p99_ms: {d99:.3f}")
        print(f"gateway_p50_ms: {g50:.3f}")
        print(f"gateway_p99_ms: {g99:.3f}")
        print(f"gateway_overhead_p50_ms: {g50 - d50:.3f}")
        print(f"gateway_overhead_p99_ms: {g99 - d99:.3f}")
        print(f"direct_rps: {direct_rps:.0f}")
        print(f"gateway_rps: {rps:.0f}")
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
