"""The gateway as a real process in front of real model servers, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
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
from gpucloud.ledger import EntryKind, Ledger, open_ledger

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def model(name: str, **kw: str) -> dict[str, object]:
    return {"namespace": "team", "name": name, "account": "alice", "product": PRODUCT, **kw}


OFFICIAL = {"visibility": "Public", "publisher": "Official"}
# Static tokens: ServiceAccounts of the namespaces the accounts list (alice owns "team").
TOKENS = {
    "tok-alice": "system:serviceaccount:team:default",
    "tok-bob": "system:serviceaccount:team-b:runner",
    "tok-carol": "system:serviceaccount:team-c:default",
    "tok-dave": "system:serviceaccount:team-d:default",
    "tok-nobody": "system:serviceaccount:elsewhere:default",
}


def bearer(account: str) -> dict[str, str]:
    return {"Authorization": f"Bearer tok-{account}"}


ALICE = bearer("alice")
MODELS = [
    model("text", **OFFICIAL, task="TextGeneration"),
    model("stream", **OFFICIAL, task="TextGeneration"),
    model("img", **OFFICIAL, task="ImageGeneration"),
    model("vid", **OFFICIAL, task="VideoGeneration"),
    model("personal", visibility="Public", publisher="Personal"),
    model("private"),
    model("never"),
    model("flaky", **OFFICIAL, task="TextGeneration"),
    model("paid", **OFFICIAL, task="TextGeneration"),
    model("cut", **OFFICIAL, task="TextGeneration"),
    model("pcut", visibility="Public", publisher="Personal"),
    model("dying", **OFFICIAL, task="TextGeneration"),
    model("owned"),
]

# The wake command: logs each wake, then becomes a model server that registers itself.
WAKE = (
    'echo "$GPUCLOUD_MODEL" >> "$1/wakes.log"; '
    '[ "$GPUCLOUD_MODEL" = never ] && exit 0; '
    'exec "$2" -m gpucloud_gateway.fake_model_server --startup-delay 1 '
    '--register "$1/endpoints.json" --key "team/$GPUCLOUD_MODEL"'
)


class Recorded:
    """What the ledger recorded: a request's row appears with its charge (one transaction)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def requests(self, key: str) -> list[dict[str, Any]]:
        return self.ledger.model_requests(key)

    def exact_total(self, account: str, key: str) -> Decimal:
        return self.ledger.model_exact_total(account, key)


@dataclass
class Bed:
    tmp: Path
    url: str
    direct: str  # a model server, called directly
    slow: str  # streams a token every 20 ms
    ledger: Ledger
    store: Recorded
    gateway: Proc


def _stats(bed: Bed) -> dict[str, Any]:
    """The gateway's /v1/stats (on its operational port)."""
    return httpx.get(bed.gateway.ops_url + "/v1/stats").json()  # type: ignore[no-any-return]


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
            "team/paid": [fast_url],
            "team/cut": [slow_url],
            "team/pcut": [slow_url],
            "team/owned": [fast_url],
        },
    )
    (tmp / "pricebook.yaml").write_text(
        yaml.safe_dump({"kind": "PriceBook", "spec": PRICEBOOK_SPEC})
    )
    ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}")
    for acct in ("alice", "bob"):
        ledger.ensure_account(acct)
        ledger.post_entry(acct, EntryKind.RECHARGE, 1_000_000, f"seed:{acct}", at=T0)
    ledger.ensure_account("carol")  # never recharged: no balance
    ledger.ensure_account("dave")  # in arrears
    ledger.post_entry("dave", EntryKind.CHARGE, -5, "debt:dave", at=T0)
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
            "auth": {"kind": "static", "tokens": TOKENS},
            "accounts": {"bob": ["team-b"], "carol": ["team-c"], "dave": ["team-d"]},
            "billing": {
                "queue": "usage-queue.db",
                "pricebook": "pricebook.yaml",
                "ledger": f"sqlite:///{tmp / 'ledger.db'}",
            },
        },
    )
    store = Recorded(ledger)
    yield Bed(tmp, url, fast_url, slow_url, ledger, store, gateway)
    gateway.stop()
    for p in procs:
        p.stop()
    ledger.close()


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
    text = httpx.get(bed.gateway.ops_url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def test_routes_counts_and_bills_official_tokens(bed: Bed) -> None:
    sizes = [(3, 10), (40, 200), (7, 1), (120, 64), (1, 16)]
    with httpx.Client(base_url=bed.url, headers=ALICE) as c:
        for words, max_tokens in sizes:
            r = c.post("/team/text/v1/chat/completions", json=chat(words, max_tokens))
            assert r.status_code == 200
            direct = httpx.post(bed.direct + "/v1/chat/completions", json=chat(words, max_tokens))
            assert r.json()["choices"] == direct.json()["choices"]
            assert r.json()["usage"]["prompt_tokens"] == words
            assert len(r.headers["x-gpucloud-request-id"]) == 32
    tokens = sum(w + m for w, m in sizes)
    exact = Decimal("0.0137") * tokens / 1000
    # every request recorded (the charge reaches its 1 fen before the last ones are)
    wait_for(lambda: store_total(bed, "alice", "team/text") == exact, what="text requests")
    wait_for(lambda: charged(bed, "alice", "text") == to_minor(exact) == 1, what="text charge")
    assert metric(bed, "gpucloud_gateway_tokens_total", model="text", type="prompt") == 171
    assert metric(bed, "gpucloud_gateway_tokens_total", model="text", type="completion") == 291
    assert metric(bed, "gpucloud_gateway_requests_total", model="text", code="200") == 5
    assert metric(bed, "gpucloud_gateway_request_duration_seconds_count", model="text") == 5
    stats = httpx.get(bed.gateway.ops_url + "/v1/stats").json()["team/text"]
    assert stats["requestsLastWindow"] == 5 and stats["inFlight"] == 0


def store_total(bed: Bed, account: str, key: str) -> Decimal:
    return bed.store.exact_total(account, key)


def test_streams_sse_through_as_it_is_produced(bed: Bed) -> None:
    async def go() -> tuple[list[tuple[float, bytes]], float]:
        got: list[tuple[float, bytes]] = []
        async with httpx.AsyncClient(base_url=bed.url, timeout=30, headers=ALICE) as c:
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
    with httpx.Client(base_url=bed.url, headers=ALICE) as c:
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
        async with httpx.AsyncClient(base_url=bed.url, timeout=30, headers=ALICE) as c:
            rs = await asyncio.gather(
                *[
                    c.post(
                        "/team/personal/v1/chat/completions",
                        json=chat(2, 2),
                        headers=bearer("bob"),
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
        async with httpx.AsyncClient(base_url=bed.url, timeout=60, headers=ALICE) as c:
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
    with httpx.Client(base_url=bed.url, headers=ALICE) as c:
        codes = [
            c.post("/team/flaky/v1/chat/completions", json=chat(1, 1)).status_code for _ in range(6)
        ]
    assert codes == [200] * 6
    wait_for(lambda: len(bed.store.requests("team/flaky")) == 6)


def test_a_client_leaving_a_stream_frees_its_slot(bed: Bed) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=bed.url, timeout=30, headers=ALICE) as c:
            body = chat(1, 500, stream=True)  # 10 s of tokens
            async with c.stream("POST", "/team/stream/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_raw():
                    break
                assert _stats(bed)["team/stream"]["inFlight"] == 1

    t0 = time.monotonic()
    asyncio.run(go())
    stats = wait_for(
        lambda: _stats(bed)["team/stream"]["inFlight"] == 0,
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
            "auth": {"kind": "none"},
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


# -- who pays: the authenticated caller ---------------------------------------------------


def test_public_model_is_paid_by_the_authenticated_caller_to_the_fen(bed: Bed) -> None:
    sizes = [(3, 10), (40, 200), (7, 1), (120, 640), (1, 16), (55, 333)]
    with httpx.Client(base_url=bed.url, headers=bearer("bob")) as c:
        for words, max_tokens in sizes:
            r = c.post("/team/paid/v1/chat/completions", json=chat(words, max_tokens))
            assert r.status_code == 200, r.text
    tokens = sum(w + m for w, m in sizes)
    exact = Decimal("0.0137") * tokens / 1000
    assert to_minor(exact) == 2
    rows = wait_for(
        lambda: len(bed.store.requests("team/paid")) == 6 and bed.store.requests("team/paid")
    )
    assert {r["account"] for r in rows} == {"bob"}
    wait_for(lambda: charged(bed, "bob", "paid") == 2, what="bob's charge")
    assert store_total(bed, "bob", "team/paid") == exact
    assert charged(bed, "alice", "paid") == 0, "the owner pays nothing for others' calls"
    assert store_total(bed, "alice", "team/paid") == 0


def test_callers_without_valid_tokens_are_refused_with_401(bed: Bed) -> None:
    url = bed.url + "/team/paid/v1/chat/completions"
    for headers in ({}, {"Authorization": "Basic Ym9iOnB3"}, {"Authorization": "Bearer"}):
        r = httpx.post(url, json=chat(1, 1), headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <token>" in r.json()["error"]["message"]
    r = httpx.post(url, json=chat(1, 1), headers={"Authorization": "Bearer forged"})
    assert r.status_code == 401 and "invalid or expired token" in r.json()["error"]["message"]
    # A valid token of a namespace no Account lists: nobody to bill.
    r = httpx.post(url, json=chat(1, 1), headers=bearer("nobody"))
    assert r.status_code == 403 and "calls for no account" in r.json()["error"]["message"]
    assert metric(bed, "gpucloud_gateway_requests_total", model="paid", code="401") == 4
    # Refused calls reach no replica and count for no autoscaling.
    stats = httpx.get(bed.gateway.ops_url + "/v1/stats").json()["team/paid"]
    assert stats["requestsTotal"] == 6


def test_callers_without_balance_or_in_arrears_get_402(bed: Bed) -> None:
    url = bed.url + "/team/paid/v1/chat/completions"
    r = httpx.post(url, json=chat(1, 1), headers=bearer("carol"))
    assert r.status_code == 402
    assert "account 'carol' has no balance (0 minor units)" in r.json()["error"]["message"]
    r = httpx.post(url, json=chat(1, 1), headers=bearer("dave"))
    assert r.status_code == 402
    assert "account 'dave' has no balance (-5 minor units)" in r.json()["error"]["message"]
    assert bed.ledger.balance("carol") == 0 and bed.ledger.balance("dave") == -5


def test_private_models_take_only_the_owners_tokens_and_bill_no_request(bed: Bed) -> None:
    url = bed.url + "/team/owned/v1/chat/completions"
    r = httpx.post(url, json=chat(1, 1), headers=bearer("bob"))
    assert r.status_code == 403
    assert "model team/owned is private" in r.json()["error"]["message"]
    assert httpx.post(url, json=chat(1, 1)).status_code == 401
    r = httpx.post(url, json=chat(4, 2), headers=ALICE)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4
    rows = wait_for(lambda: bed.store.requests("team/owned"))
    assert len(rows) == 1 and rows[0]["amount"] is None  # online time pays for it
    assert charged(bed, "alice", "owned") == 0


def test_the_callers_token_is_not_forwarded_to_the_model(bed: Bed) -> None:
    r = httpx.get(bed.url + "/team/paid/debug/headers", headers={**bearer("bob"), "X-Trace": "7"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["x-trace"] == "7" and len(seen["x-gpucloud-request-id"]) == 32
    assert "authorization" not in seen, "a model's code must never see the caller's token"


# -- partial streams: what was delivered is billed, once ----------------------------------


async def read_then_leave(url: str, body: dict[str, object], chunks: int) -> tuple[int, float]:
    """Stream ``body``, leave after ``chunks`` content chunks: (contents seen, seconds)."""
    seen = 0
    t0 = time.perf_counter()
    async with (
        httpx.AsyncClient(timeout=30, headers=bearer("bob")) as c,
        c.stream("POST", url, json=body) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                seen += bool(json.loads(line[6:])["choices"])
            if seen >= chunks:
                break  # the client closes the connection mid-stream
    return seen, time.perf_counter() - t0


def test_a_cut_personal_stream_bills_the_runtime_up_to_the_cut(bed: Bed) -> None:
    # 500 tokens 20 ms apart: 10 s if read to the end; the client leaves after 10.
    url = bed.url + "/team/pcut/v1/chat/completions"
    seen, held_s = asyncio.run(read_then_leave(url, chat(2, 500, stream=True), 10))
    assert seen == 10
    rows = wait_for(lambda: bed.store.requests("team/pcut"), what="the cut request's row")
    assert len(rows) == 1
    row = rows[0]
    assert row["account"] == "bob" and row["status"] == 200
    # Runtime ends at the cut: at least 10 tokens' time, far from the 10 s of the whole.
    assert 9 * 20 <= row["runtime_ms"] <= held_s * 1000 + 500 < 5000
    exact = Decimal("0.0031") * row["runtime_ms"] / 1000
    assert store_total(bed, "bob", "team/pcut") == exact
    # Exactly once: a later request is the meter's second row, no duplicate of the first.
    with httpx.Client(base_url=bed.url, headers=bearer("bob")) as c:
        assert c.post("/team/pcut/v1/chat/completions", json=chat(1, 1)).status_code == 200
    rows = wait_for(
        lambda: len(bed.store.requests("team/pcut")) == 2 and bed.store.requests("team/pcut")
    )
    assert len({r["request_id"] for r in rows}) == 2
    total = Decimal("0.0031") * sum(r["runtime_ms"] for r in rows) / 1000
    assert charged(bed, "bob", "pcut") == to_minor(total)


def test_a_cut_official_stream_bills_the_tokens_delivered(bed: Bed) -> None:
    url = bed.url + "/team/cut/v1/chat/completions"
    seen, _ = asyncio.run(read_then_leave(url, chat(30, 500, stream=True), 40))
    assert seen == 40
    rows = wait_for(lambda: bed.store.requests("team/cut"), what="the cut request's row")
    assert len(rows) == 1
    row = rows[0]
    # No final usage chunk came: the delivered content chunks are the completion tokens
    # (a few more may have been in flight to the client when it left); prompt unknown.
    assert 40 <= row["completion_tokens"] < 100
    assert row["prompt_tokens"] == 0
    exact = Decimal("0.0137") * row["completion_tokens"] / 1000
    assert store_total(bed, "bob", "team/cut") == exact
    assert metric(bed, "gpucloud_gateway_in_flight", model="cut") == 0


def test_a_replica_dying_mid_stream_bills_what_it_delivered(bed: Bed) -> None:
    proc, url = start_model_server(bed.tmp, "dying", "--die-after", "7", "--token-ms", "5")
    try:
        endpoints = json.loads((bed.tmp / "endpoints.json").read_text())
        write_endpoints(bed.tmp / "endpoints.json", {**endpoints, "team/dying": [url]})
        got: list[str] = []

        async def go() -> None:
            async with httpx.AsyncClient(timeout=30, headers=bearer("bob")) as c:
                body = chat(3, 50, stream=True)
                async with c.stream(
                    "POST", bed.url + "/team/dying/v1/chat/completions", json=body
                ) as r:
                    assert r.status_code == 200
                    with contextlib.suppress(httpx.HTTPError):
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                got.append(line)

        asyncio.run(go())
        proc.popen.wait(10)
    finally:
        proc.stop()
    assert len(got) == 7, "the client got the 7 tokens sent before the replica died"
    rows = wait_for(lambda: bed.store.requests("team/dying"), what="the broken request's row")
    assert len(rows) == 1
    assert (rows[0]["completion_tokens"], rows[0]["prompt_tokens"]) == (7, 0)
    assert store_total(bed, "bob", "team/dying") == Decimal("0.0137") * 7 / 1000


def test_operational_endpoints_are_not_on_the_main_port(bed: Bed) -> None:
    """/metrics and /v1/stats name models, traffic and replica pod IPs: only on the
    operational port, which the chart does not publish (issue 16, finding 8)."""
    for path in ("/metrics", "/v1/stats", "/v1/stats?scope=local"):
        r = httpx.get(bed.url + path, follow_redirects=True)
        assert r.status_code == 404 and "team/" not in r.text, path
    assert "team/text" in httpx.get(bed.gateway.ops_url + "/v1/stats").text
    assert "gpucloud_gateway" in httpx.get(bed.gateway.ops_url + "/metrics").text
