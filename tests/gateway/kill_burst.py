"""A burst of paid requests through a gateway that is killed with SIGKILL again and again
while the ledger is slow, then a comparison of what callers received with what was billed.

Used by ``test_gateway_kill.py`` and ``bench/gateway_kill_bench.py``. Everything is real:
a model server process, gateway processes (``kill -9``, restarted on the same ports), a
SQLite ledger whose write lock another connection holds for 2.3 s at a time, callers
over HTTP that retry what they did not get. Half the requests go to an official model
(per token), half to a personal one (per second of runtime); half of each stream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml
from gateway_testkit import (
    PRICEBOOK_SPEC,
    PRODUCT,
    Proc,
    free_port,
    start_gateway,
    start_model_server,
    wait_for,
    write_endpoints,
)

from gpucloud.billing import to_minor
from gpucloud.ledger import EntryKind, open_ledger

TOKEN = "bob-token"
PER_1K = Decimal(PRICEBOOK_SPEC["models"]["per1KTokens"])
MODELS = [
    {
        "namespace": "team",
        "name": "text",
        "account": "alice",
        "visibility": "Public",
        "publisher": "Official",
        "task": "TextGeneration",
        "product": PRODUCT,
    },
    {
        "namespace": "team",
        "name": "personal",
        "account": "alice",
        "visibility": "Public",
        "publisher": "Personal",
        "product": PRODUCT,
    },
]


@dataclass(frozen=True)
class Answer:
    """A complete answer a caller received (a 200 body read to its end, or a stream up
    to its ``data: [DONE]``)."""

    request_id: str
    model: str
    tokens: int | None  # official model: prompt + completion tokens the caller was told


@dataclass
class Outcome:
    answered: list[Answer]
    rows: dict[str, dict[str, Any]]  # request id -> the ledger's row
    kills: int
    left_unposted: int  # records the last killed gateway left in its queue
    unbilled: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # /v1/stats after the restart

    @property
    def billed_unanswered(self) -> int:
        """Rows of requests recorded but cut by a kill before the caller had them."""
        return len(self.rows.keys() - {a.request_id for a in self.answered})


class LedgerLock:
    """Holds the ledger's SQLite write lock for ``hold_s`` at a time, with short gaps."""

    def __init__(self, path: Path, hold_s: float = 2.3, gap_s: float = 0.05) -> None:
        self.path, self.hold_s, self.gap_s = path, hold_s, gap_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.holds = 0

    def _run(self) -> None:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            while not self._stop.is_set():
                db.execute("BEGIN IMMEDIATE")
                self.holds += 1
                self._stop.wait(self.hold_s)
                db.execute("COMMIT")
                self._stop.wait(self.gap_s)
        finally:
            db.close()

    def __enter__(self) -> LedgerLock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _request(i: int) -> tuple[str, bool, dict[str, Any]]:
    model = "text" if i % 2 == 0 else "personal"
    stream = (i // 2) % 2 == 0
    words = " ".join(["w"] * (1 + i % 5))
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": 3 + i % 7}
    if stream:
        body["stream"] = True
    return model, stream, body


async def _once(client: httpx.AsyncClient, i: int) -> Answer | None:
    """One attempt; None if the caller did not get a complete answer."""
    model, stream, body = _request(i)
    path = f"/team/{model}/v1/chat/completions"
    headers = {"authorization": f"Bearer {TOKEN}"}
    if not stream:
        r = await client.post(path, json=body, headers=headers)
        if r.status_code != 200:
            return None
        usage = r.json()["usage"]
        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
        return Answer(r.headers["x-gpucloud-request-id"], model, tokens)
    done, tokens, rid = False, None, ""
    try:
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                return None
            rid = r.headers["x-gpucloud-request-id"]
            async for line in r.aiter_lines():
                if line.strip() == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"usage"' in line:
                    usage = json.loads(line[6:])["usage"]
                    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    except httpx.TransportError:
        pass  # cut after [DONE] still counts: the caller had the whole answer
    return Answer(rid, model, tokens if model == "text" else None) if done else None


def run_burst(tmp: Path, requests: int = 800, kills: int = 3, concurrency: int = 24) -> Outcome:
    """The burst with ``kills`` kills spread over it, one more at its end (so records are
    left in the queue), then a restart that gets no request at all and must record them
    in the ledger."""
    server, server_url = start_model_server(tmp, "model", "--token-ms", "2")
    write_endpoints(
        tmp / "endpoints.json", {"team/text": [server_url], "team/personal": [server_url]}
    )
    (tmp / "pricebook.yaml").write_text(
        yaml.safe_dump({"kind": "PriceBook", "spec": PRICEBOOK_SPEC})
    )
    ledger_path = tmp / "ledger.db"
    ledger = open_ledger(f"sqlite:///{ledger_path}")
    ledger.ensure_account("alice")
    ledger.ensure_account("bob")
    ledger.post_entry("bob", EntryKind.RECHARGE, 10**9, "seed:bob", at=datetime.now(UTC))
    config = {
        "models": MODELS,
        "endpoints": {"kind": "file", "path": "endpoints.json"},
        "auth": {"kind": "static", "tokens": {TOKEN: "system:serviceaccount:team-b:default"}},
        "accounts": {"bob": ["team-b"]},
        "billing": {
            "queue": "usage-queue.db",
            "pricebook": "pricebook.yaml",
            "ledger": f"sqlite:///{ledger_path}",
        },
    }
    port, ops_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    runs = [0]

    def start() -> Proc:
        runs[0] += 1
        return start_gateway(tmp, config, port, f"gateway{runs[0]}", ops_port=ops_port)[0]

    gateway = start()
    try:
        with LedgerLock(ledger_path):
            answered, gateway = asyncio.run(
                _burst(url, requests, kills, concurrency, start, gateway)
            )
            gateway.stop(signal.SIGKILL)  # the last kill: its queue is not drained yet
            left = _unposted(tmp / "usage-queue.db")
        gateway = start()  # the ledger is fast again; no request comes
        wait_for(lambda: _unposted(tmp / "usage-queue.db") == 0, 60, "recording at startup")
        stats = httpx.get(gateway.ops_url + "/v1/stats").json()
        return _compare(answered, _rows(ledger), ledger, kills + 1, left, stats)
    finally:
        gateway.stop()
        server.stop()
        ledger.close()


async def _burst(
    url: str, requests: int, kills: int, concurrency: int, start: Any, gateway: Proc
) -> tuple[list[Answer], Proc]:
    """The answers callers got, and the gateway process running at the end."""
    answered: list[Answer] = []
    up = asyncio.Event()
    up.set()
    milestone = asyncio.Event()
    marks = [requests * (k + 1) // (kills + 1) for k in range(kills)]
    todo = iter(range(requests))
    current = [gateway]

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            for _attempt in range(200):
                await up.wait()
                try:
                    answer = await _once(client, i)
                except httpx.TransportError:
                    answer = None
                if answer is not None:
                    answered.append(answer)
                    if marks and len(answered) >= marks[0]:
                        milestone.set()
                    break
            else:
                raise AssertionError(f"request {i} never got an answer")

    async def killer() -> None:
        while marks:
            await milestone.wait()
            milestone.clear()
            marks.pop(0)
            up.clear()
            current[0].stop(signal.SIGKILL)
            current[0] = await asyncio.to_thread(start)
            up.set()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        if marks:  # the burst ended before the last mark (cannot with marks < requests)
            raise AssertionError(f"kills left undone at marks {marks}")
        await kill_task
    return answered, current[0]


def _unposted(path: Path) -> int:
    """Records the gateway's local queue holds: not known to be in the ledger yet."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM queued").fetchone()[0])
    finally:
        db.close()


def _rows(ledger: Any) -> dict[str, dict[str, Any]]:
    """The request rows the ledger holds (each recorded with its charge)."""
    rows = [r for m in ("team/text", "team/personal") for r in ledger.model_requests(m)]
    return {r["request_id"]: r for r in rows}


def _compare(
    answered: list[Answer],
    rows: dict[str, dict[str, Any]],
    ledger: Any,
    kills: int,
    left: int,
    stats: dict[str, Any],
) -> Outcome:
    out = Outcome(answered, rows, kills, left, stats=stats)
    out.unbilled = [a.request_id for a in answered if a.request_id not in rows]
    for a in answered:
        row = rows.get(a.request_id)
        billed = row and row["prompt_tokens"] + row["completion_tokens"]
        if row is not None and a.tokens is not None and billed != a.tokens:
            out.mismatches.append(f"{a.request_id}: billed {billed} tokens, told {a.tokens}")
    # The ledger: one posting per request at most, and per model the stored exact total
    # rounded once (so nothing was posted twice or left out).
    entries = ledger.entries("bob", limit=10_000)
    keys = Counter(e.key for e in entries if e.key.startswith("model-request:"))
    out.doubled = [k for k, n in keys.items() if n > 1]
    out.doubled += [k for k in keys if k.rsplit(":", 1)[1] not in rows]
    charged = ledger.charges_by_resource("bob")
    for model in ("team/text", "team/personal"):
        mine = [r for r in rows.values() if r["model"] == model]
        exact = sum((Decimal(r["amount"]) for r in mine), Decimal(0))
        if charged.get(f"model/{model}", 0) != to_minor(exact):
            out.mismatches.append(
                f"{model}: ledger {charged.get(f'model/{model}', 0)} != {to_minor(exact)}"
            )
        if model == "team/text":  # the callers' own view of the tokens they were sold
            told = sum(a.tokens or 0 for a in answered if a.model == "text")
            cut = sum(
                r["prompt_tokens"] + r["completion_tokens"]
                for r in mine
                if r["request_id"] not in {a.request_id for a in answered}
            )
            if exact != PER_1K * (told + cut) / 1000:
                out.mismatches.append(f"{model}: exact total {exact} != the answers' tokens")
    return out
