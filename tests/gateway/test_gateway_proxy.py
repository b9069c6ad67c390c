"""The gateway as a real process in front of real model servers, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml
from gateway_testkit import (
    PRICEBOOK_SPEC,
    PRODUCT,
    Proc,
    free_port,
    pricebook,
    start_gateway,
    start_model_server,
    wait_for,
    write_endpoints,
)
from gpucloud_gateway.billing import BillingStore

from gpucloud.billing import to_minor
from gpucloud.ledger import EntryKind, Ledger, open_ledger

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def model(name: str, **kw: str) -> dict[str, object]:
    return {"namespace": "team", "name": name, "account": "alice", "product": PRODUCT, **kw}


OFFICIAL = {"visibility": "Public", "publisher": "Official"}
MODELS = [
    model("text", **OFFICIAL, task="TextGeneration"),
    model("stream", **OFFICIAL, task="TextGeneration"),
    model("img", **OFFICIAL, task="ImageGeneration"),
    model("vid", **OFFICIAL, task="VideoGeneration"),
    model("personal", visibility="Public", publisher="Personal"),
    model("private"),
    model("never"),
    model("flaky", **OFFICIAL, task="TextGeneration"),
]

# The wake command: logs each wake, then becomes a model server that registers itself.
WAKE = (
    'echo "$GPUCLOUD_MODEL" >> "$1/wakes.log"; '
    '[ "$GPUCLOUD_MODEL" = never ] && exit 0; '
    'exec "$2" -m gpucloud_gateway.fake_model_server --startup-delay 1 '
    '--register "$1/endpoints.json" --key "team/$GPUCLOUD_MODEL"'
)


@dataclass
class Bed:
    tmp: Path
    url: str
    direct: str  # a model server, called directly
    slow: str  # streams a token every 20 ms
    ledger: Ledger
    store: BillingStore
    gateway: Proc


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tmp = tmp_path_factory.mktemp("gw")
    procs: list[Proc] = []
    fast, fast_url = start_model_server(tmp, "fast")
    slow, slow_url = start_model_server(tmp, "slow", "--token-ms", "20")
    lazy, lazy_url = start_model_server(tmp, "lazy", "--latency-ms", "30")
    procs += [fast, slow, lazy]
    write_endpoints(
        tmp / "endpoints.json",
        {
            "team/text": [fast_url],
            "team/stream": [slow_url],
            "team/img": [fast_url],
            "team/vid": [fast_url],
            "team/personal": [lazy_url, fast_url],
            "team/private": [],
            "team/flaky": [f"http://127.0.0.1:{free_port()}", fast_url],  # one is down
        },
    )
    (tmp / "pricebook.yaml").write_text(
        yaml.safe_dump({"kind": "PriceBook", "spec": PRICEBOOK_SPEC})
    )
    ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}")
    for acct in ("alice", "bob"):
        ledger.ensure_account(acct)
        ledger.post_entry(acct, EntryKind.RECHARGE, 1_000_000, f"seed:{acct}", at=T0)
    gateway, url = start_gateway(
        tmp,
        {
            "models": MODELS,
            "endpoints": {"kind": "file", "path": "endpoints.json"},
            "scaler": {
                "kind": "command",
                "argv": ["sh", "-c", WAKE, "wake", str(tmp), sys.executable],
            },
            "wakeTimeoutSeconds": 30,
            "retryAfterSeconds": 7,
            "payerHeader": "X-Gpucloud-Account",
            "billing": {
                "store": "usage.db",
                "pricebook": "pricebook.yaml",
                "ledger": f"sqlite:///{tmp / 'ledger.db'}",
            },
        },
    )
    store = BillingStore(tmp / "usage.db", pricebook())
    yield Bed(tmp, url, fast_url, slow_url, ledger, store, gateway)
    gateway.stop()
    for p in procs:
        p.stop()
    ledger.close()
    store.close()


def chat(words: int, max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": " ".join(["w"] * words)}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def charged(bed: Bed, account: str, model: str) -> int:
    return bed.ledger.charges_by_resource(account).get(f"model/team/{model}", 0)


def metric(bed: Bed, name: str, **labels: str) -> float:
    text = httpx.get(bed.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def test_routes_counts_and_bills_official_tokens(bed: Bed) -> None:
    sizes = [(3, 10), (40, 200), (7, 1), (120, 64), (1, 16)]
    with httpx.Client(base_url=bed.url) as c:
        for words, max_tokens in sizes:
            r = c.post("/team/text/v1/chat/completions", json=chat(words, max_tokens))
            assert r.status_code == 200
            direct = httpx.post(bed.direct + "/v1/chat/completions", json=chat(words, max_tokens))
            assert r.json()["choices"] == direct.json()["choices"]
            assert r.json()["usage"]["prompt_tokens"] == words
            assert len(r.headers["x-gpucloud-request-id"]) == 32
    tokens = sum(w + m for w, m in sizes)
    exact = Decimal("0.0137") * tokens / 1000
    wait_for(lambda: charged(bed, "alice", "text") == to_minor(exact) == 1, what="text charge")
    assert store_total(bed, "alice", "team/text") == exact
    assert metric(bed, "gpucloud_gateway_tokens_total", model="text", type="prompt") == 171
    assert metric(bed, "gpucloud_gateway_tokens_total", model="text", type="completion") == 291
    assert metric(bed, "gpucloud_gateway_requests_total", model="text", code="200") == 5
    assert metric(bed, "gpucloud_gateway_request_duration_seconds_count", model="text") == 5
    stats = httpx.get(bed.url + "/v1/stats").json()["team/text"]
    assert stats["requestsLastWindow"] == 5 and stats["inFlight"] == 0


def store_total(bed: Bed, account: str, key: str) -> Decimal:
    return bed.store.exact_total(account, key)


def test_streams_sse_through_as_it_is_produced(bed: Bed) -> None:
    async def go() -> tuple[list[tuple[float, bytes]], float]:
        got: list[tuple[float, bytes]] = []
        async with httpx.AsyncClient(base_url=bed.url, timeout=30) as c:
            t0 = time.perf_counter()
            body = chat(5, 25, stream=True)
            async with c.stream("POST", "/team/stream/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                async for chunk in r.aiter_raw():
                    got.append((time.perf_counter() - t0, chunk))
            return got, time.perf_counter() - t0

    chunks, total = asyncio.run(go())
    # 25 tokens 20 ms apart: the first arrives long before the stream ends.
    assert total >= 0.45
    assert chunks[0][0] < total - 0.3, "the gateway buffered the stream"
    body = b"".join(c for _, c in chunks).decode()
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert "".join(contents) == "".join(f"tok{i} " for i in range(25))
    # The gateway asked for usage (the client did not): the final chunk carries it.
    assert json.loads(events[-2])["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 25,
        "total_tokens": 30,
    }
    wait_for(lambda: store_total(bed, "alice", "team/stream") == Decimal("0.0137") * 30 / 1000)


def test_images_and_videos_are_counted_and_billed(bed: Bed) -> None:
    with httpx.Client(base_url=bed.url) as c:
        for n in (1, 4, 2):
            r = c.post("/team/img/v1/images/generations", json={"prompt": "a cat", "n": n})
            assert len(r.json()["data"]) == n
        for n in (1, 2):
            c.post("/team/vid/v1/videos/generations", json={"prompt": "a cat", "n": n})
    wait_for(lambda: charged(bed, "alice", "img") == to_minor(Decimal("0.0815") * 7) == 57)
    wait_for(lambda: charged(bed, "alice", "vid") == to_minor(Decimal("1.2345") * 3) == 370)
    assert metric(bed, "gpucloud_gateway_images_total", model="img") == 7
    assert metric(bed, "gpucloud_gateway_videos_total", model="vid") == 3


def test_personal_model_bills_the_callers_request_runtime(bed: Bed) -> None:
    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=bed.url, timeout=30) as c:
            rs = await asyncio.gather(
                *[
                    c.post(
                        "/team/personal/v1/chat/completions",
                        json=chat(2, 2),
                        headers={"X-Gpucloud-Account": "bob"},
                    )
                    for _ in range(12)
                ]
            )
        return [r.status_code for r in rs]

    assert asyncio.run(go()) == [200] * 12
    rows = wait_for(
        lambda: (
            len(bed.store.requests("team/personal")) == 12 and bed.store.requests("team/personal")
        )
    )
    assert {r["account"] for r in rows} == {"bob"}
    runtimes = [r["runtime_ms"] for r in rows]
    assert sum(1 for ms in runtimes if ms >= 30) >= 1  # some went to the slow replica
    exact = Decimal("0.0031") * sum(runtimes) / 1000
    wait_for(lambda: charged(bed, "bob", "personal") == to_minor(exact), what="personal charge")
    assert charged(bed, "alice", "personal") == 0


def test_cold_private_model_wakes_once_and_loses_no_request(bed: Bed) -> None:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=bed.url, timeout=60) as c:
            return await asyncio.gather(
                *[c.post("/team/private/v1/chat/completions", json=chat(i, 3)) for i in range(25)]
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 25
    assert [r.json()["usage"]["prompt_tokens"] for r in responses] == list(range(25))
    assert (bed.tmp / "wakes.log").read_text().split() == ["private"]
    assert metric(bed, "gpucloud_gateway_wakes_total", model="private", outcome="ready") == 1
    wait_for(lambda: len(bed.store.requests("team/private")) == 25)
    # Private models are billed by online time, not per request.
    assert charged(bed, "alice", "private") == 0


def test_a_replica_that_refuses_connections_is_skipped(bed: Bed) -> None:
    with httpx.Client(base_url=bed.url) as c:
        codes = [
            c.post("/team/flaky/v1/chat/completions", json=chat(1, 1)).status_code for _ in range(6)
        ]
    assert codes == [200] * 6
    wait_for(lambda: len(bed.store.requests("team/flaky")) == 6)


def test_a_client_leaving_a_stream_frees_its_slot(bed: Bed) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=bed.url, timeout=30) as c:
            body = chat(1, 500, stream=True)  # 10 s of tokens
            async with c.stream("POST", "/team/stream/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_raw():
                    break
                assert httpx.get(bed.url + "/v1/stats").json()["team/stream"]["inFlight"] == 1

    t0 = time.monotonic()
    asyncio.run(go())
    stats = wait_for(
        lambda: httpx.get(bed.url + "/v1/stats").json()["team/stream"]["inFlight"] == 0,
        timeout=5,
        what="in-flight back to 0",
    )
    assert stats and time.monotonic() - t0 < 5


def test_unknown_model_is_a_404(bed: Bed) -> None:
    r = httpx.post(bed.url + "/team/nope/v1/chat/completions", json={})
    assert r.status_code == 404 and "no model 'nope'" in r.json()["error"]["message"]


def test_wake_timeout_is_a_503_with_retry_after(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text("{}")
    gateway, url = start_gateway(
        tmp_path,
        {
            "models": [model("never")],
            "endpoints": {"kind": "file", "path": "endpoints.json"},
            "wakeTimeoutSeconds": 0.5,
            "retryAfterSeconds": 7,
        },
    )
    try:
        t0 = time.monotonic()
        r = httpx.post(url + "/team/never/v1/chat/completions", json={}, timeout=10)
        assert time.monotonic() - t0 >= 0.5
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        assert "starting from cold" in r.json()["error"]["message"]
    finally:
        gateway.stop()
