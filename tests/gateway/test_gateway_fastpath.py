"""The request path's shortcuts (issue 20) keep the behaviour they replace: the proxy
fast path routes as Starlette's table does, the outbox's group commit (in the event
loop, or the writer thread while the queue is busy) answers every waiting request with
its group's outcome, and records encode as they always did."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gpucloud_gateway.app import Gateway, ProxyFastPath
from gpucloud_gateway.discovery import StaticEndpoints
from gpucloud_gateway.main import main as gateway_main
from gpucloud_gateway.outbox import Outbox, UsageQueue, _decode, _encode
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from gpucloud.billing.model_charges import ModelPlan, UsageEvent
from gpucloud.serving import loop_factory

PLAN = ModelPlan(
    namespace="team-a",
    name="llm",
    account="alice",
    visibility="Public",
    publisher="Official",
    task="TextGeneration",
)


def event(request_id: str) -> UsageEvent:
    return UsageEvent(
        request_id=request_id,
        namespace="team-a",
        model="llm",
        at=datetime(2026, 12, 5, 4, 30, 0, 123456, tzinfo=UTC),
        runtime_ms=1234,
        status=200,
        prompt_tokens=7,
        completion_tokens=19,
    )


# Paths and methods the fast path takes, and ones it must leave to Starlette.
CASES = [
    ("POST", "/team-a/llm/v1/chat/completions"),
    ("GET", "/team-a/llm/"),
    ("GET", "/nobody/none/v1/models"),
    ("DELETE", "/team-a/llm/a/b/c"),
    ("GET", "/team-a/llm"),  # no path part: not the proxy route
    ("GET", "/team-a"),
    ("GET", "//llm/x"),  # empty namespace
    ("TRACE", "/team-a/llm/x"),  # a method the route does not take
    ("GET", "/healthz"),
    ("GET", "/readyz"),
]


@pytest.mark.parametrize(("method", "path"), CASES)
def test_the_fast_path_answers_as_starlettes_route_table(method: str, path: str) -> None:
    # No replica and an instant wake timeout: a known model answers 503, an unknown 404.
    gateway = Gateway([PLAN], StaticEndpoints({}), wake_timeout_s=0.0)
    app = gateway.app()
    assert isinstance(app, ProxyFastPath)
    with TestClient(app) as fast, TestClient(app.app) as reference:
        got = fast.request(method, path, follow_redirects=False)
        want = reference.request(method, path, follow_redirects=False)
    assert (got.status_code, got.content) == (want.status_code, want.content)
    assert got.headers.get("retry-after") == want.headers.get("retry-after")


def test_a_failing_handler_answers_500_and_the_error_is_raised() -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("handler broke")

    inner = Gateway([PLAN], StaticEndpoints({})).app().app
    with TestClient(ProxyFastPath(inner, boom), raise_server_exceptions=False) as client:
        r = client.post("/team-a/llm/v1/chat/completions")
    assert (r.status_code, r.text) == (500, "Internal Server Error")
    with (
        TestClient(ProxyFastPath(inner, boom)) as client,
        pytest.raises(RuntimeError, match="handler broke"),
    ):
        client.post("/team-a/llm/v1/chat/completions")


def test_a_record_encodes_as_the_deep_copy_did_and_decodes_back() -> None:
    ev = event("abc")
    text = _encode(PLAN, ev, "bob")
    old = {
        "plan": dataclasses.asdict(PLAN),
        "event": dataclasses.asdict(ev) | {"at": ev.at.isoformat()},
        "payer": "bob",
    }
    assert json.loads(text) == old
    assert _decode(text) == (PLAN, ev, "bob")
    assert _decode(_encode(PLAN, ev, None)) == (PLAN, ev, None)


def test_one_loop_iterations_records_are_one_commit_in_the_loop(tmp_path: Path) -> None:
    usage = UsageQueue(tmp_path / "q.db")
    real = usage.try_append_many
    groups: list[int] = []
    tasks: list[asyncio.Task[None]] = []

    def spy(records: Any) -> bool:
        assert threading.current_thread() is threading.main_thread()  # the loop's
        assert not any(t.done() for t in tasks)  # none answered before its commit
        records = list(records)
        groups.append(len(records))
        return real(records)

    usage.try_append_many = spy  # type: ignore[method-assign]
    outbox = Outbox(usage)

    async def run() -> None:
        tasks.extend(
            asyncio.create_task(outbox.record(PLAN, event(f"r{i}"), "bob")) for i in range(50)
        )
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(run())
    outbox.close()
    assert groups == [50]  # the 50 tasks' first steps ran in one iteration: one commit
    assert sorted(e.request_id for _, (_, e, _) in usage.peek()) == sorted(
        f"r{i}" for i in range(50)
    )
    usage.close()


def test_a_busy_queue_is_committed_by_the_thread_while_the_loop_goes_on(tmp_path: Path) -> None:
    """The drain process holds the queue's write lock for a moment each second: the
    loop's commit then neither waits nor fails; the writer thread waits for the lock,
    and the requests are answered once their records are committed."""
    usage = UsageQueue(tmp_path / "q.db")
    holder = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as the drain's DELETE does
    outbox = Outbox(usage)

    async def run() -> int:
        ticks = 0
        tasks = [asyncio.create_task(outbox.record(PLAN, event(f"r{i}"), "bob")) for i in range(20)]
        outbox.record_later(PLAN, event("cut"), None)
        while ticks < 20:  # the loop runs on while the lock is held
            await asyncio.sleep(0.01)
            ticks += 1
        assert not any(t.done() for t in tasks)  # not committed: not answered
        holder.execute("COMMIT")
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return ticks

    assert asyncio.run(run()) == 20
    outbox.close()
    holder.close()
    assert sorted(e.request_id for _, (_, e, _) in usage.peek()) == sorted(
        [f"r{i}" for i in range(20)] + ["cut"]
    )
    usage.close()


@pytest.mark.parametrize("fsync", [False, True])
def test_a_failed_group_commit_fails_every_request_in_it(tmp_path: Path, fsync: bool) -> None:
    usage = UsageQueue(tmp_path / "q.db", fsync=fsync)

    def broken(records: Any) -> None:
        raise OSError("disk full")

    # in the loop without fsync, in the writer thread with it
    usage.try_append_many = broken  # type: ignore[method-assign]
    usage.append_many = broken  # type: ignore[method-assign]
    outbox = Outbox(usage)
    assert outbox.in_loop is not fsync

    async def run() -> list[Any]:
        calls = [outbox.record(PLAN, event(f"r{i}"), "bob") for i in range(20)]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)

    results = asyncio.run(run())
    outbox.close()
    assert all(isinstance(r, OSError) and "disk full" in str(r) for r in results)
    assert usage.pending() == 0
    usage.close()


def test_with_fsync_the_writer_thread_commits(tmp_path: Path) -> None:
    usage = UsageQueue(tmp_path / "q.db", fsync=True)
    outbox = Outbox(usage)
    threads: set[str] = set()
    real = usage.append_many

    def spy(records: Any) -> None:
        threads.add(threading.current_thread().name)
        real(records)

    usage.append_many = spy  # type: ignore[method-assign]

    async def run() -> None:
        await asyncio.gather(*(outbox.record(PLAN, event(f"r{i}"), "bob") for i in range(5)))

    asyncio.run(run())
    outbox.close()
    assert threads == {"usage-outbox"} and usage.pending() == 5
    usage.close()


def test_request_ids_are_unique_across_gateways_and_uuid_shaped() -> None:
    a, b = Gateway([PLAN], StaticEndpoints({})), Gateway([PLAN], StaticEndpoints({}))
    ids = [a._request_id() for _ in range(1000)] + [b._request_id() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_the_gateway_asks_for_uvloop_and_gets_it_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory(True) is uvloop.new_event_loop
    assert loop_factory(False) is None  # the others stay on asyncio's loop
    assert "uvloop=True" in Path(gateway_main.__code__.co_filename).read_text()


@contextlib.asynccontextmanager
async def through_gateway(handler: Any, host: str) -> AsyncIterator[Any]:
    """An aiohttp replica answering with ``handler`` (addressed as ``host``), behind a
    gateway: yields an httpx transport to the gateway."""
    import httpx
    from aiohttp import web

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(upstream)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gateway = Gateway([PLAN], StaticEndpoints({"team-a/llm": [f"http://{host}:{port}"]}))
    try:
        yield httpx.ASGITransport(app=gateway.app())
    finally:
        await gateway.aclose()
        await runner.cleanup()


def test_a_cookie_one_callers_replica_sets_never_reaches_another_callers_request() -> None:
    """The upstream pool is shared by all callers: it keeps no cookies (a cookie jar would
    send one caller's cookie along with another caller's request)."""
    import httpx
    from aiohttp import web

    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        resp.set_cookie("session", "caller-one-secret")
        return resp

    async def run() -> list[str]:
        got = []
        async with through_gateway(handler, "localhost") as transport:
            for _ in range(2):  # two callers, each its own client (and cookie jar)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                    got.append(await c.post("/team-a/llm/v1/chat/completions"))
        return [r.headers.get("set-cookie", "") for r in got]

    cookies = asyncio.run(run())
    assert all("caller-one-secret" in c for c in cookies)  # relayed to its caller
    assert seen == [None, None]  # and never sent upstream again


def test_the_query_string_reaches_the_replica_as_sent() -> None:
    import httpx
    from aiohttp import web

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({})

    async def run() -> None:
        async with (
            through_gateway(handler, "127.0.0.1") as transport,
            httpx.AsyncClient(transport=transport, base_url="http://gw") as c,
        ):
            await c.get("/team-a/llm/v1/models?a=1&b=%20x%2F")
            await c.get("/team-a/llm/v1/models")

    asyncio.run(run())
    assert seen == ["/v1/models?a=1&b=%20x%2F", "/v1/models"]
