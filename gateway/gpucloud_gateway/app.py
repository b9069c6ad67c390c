"""The gateway: a streaming reverse proxy from ``/<namespace>/<model>/<path>`` to replicas.

For every request it counts the arrival (the autoscaler's request volume), picks the
replica with the fewest requests in flight, streams the response back untouched while a
:class:`~gpucloud_gateway.metering.UsageTap` reads usage from it, and records a
:class:`~gpucloud.billing.model_charges.UsageEvent` (runtime, tokens, images, videos) under a
request id the gateway generates: durably, before the caller gets the response's last
bytes (see ``gpucloud_gateway.outbox``). A request to a model without
ready replicas triggers one wake per model (all requests arriving meanwhile wait on the
same wake, none is dropped) and gets a 503 with Retry-After if no replica is ready within
the wake timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpucloud.billing.model_charges import ModelPlan, Rule, UsageEvent
from gpucloud.clock import Clock, SystemClock
from gpucloud_gateway.callers import Caller, CallerError, Callers
from gpucloud_gateway.discovery import EndpointSource, NoScaler, Scaler
from gpucloud_gateway.metering import UsageTap
from gpucloud_gateway.upstream import ConnectError, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
HOP_BY_HOP_RAW = frozenset(h.encode() for h in HOP_BY_HOP)
REQUEST_ID_HEADER = "x-gpucloud-request-id"
# Request headers not forwarded upstream (Accept-Encoding: the gateway reads usage from
# the body; the caller's credentials never reach a model's code).
DROP_ALWAYS = HOP_BY_HOP | {"accept-encoding", "content-length"}
DROP_AUTHENTICATED = DROP_ALWAYS | {"authorization"}


class Recorder(Protocol):
    """Where usage goes (``gpucloud_gateway.outbox.Outbox``)."""

    async def record(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Return once the record is durable."""

    def record_later(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Record without waiting (a cut response)."""


class WakeTimeout(Exception):
    pass


@dataclass
class ModelStats:
    """Per model: arrivals in the scaling window, last request, requests in flight."""

    window_s: float
    # [whole second, arrivals in it]: memory bounded by the window, not the request rate
    buckets: deque[list[int]] = field(default_factory=deque)
    last_request_at: datetime | None = None
    in_flight: int = 0
    queued: int = 0
    total: int = 0

    def arrive(self, now: datetime) -> None:
        second = int(now.timestamp())
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([second, 1])
        self.last_request_at = now
        self.total += 1

    def in_window(self, now: datetime) -> int:
        """Arrivals in the last ``window_s`` seconds (whole-second resolution)."""
        cutoff = int(now.timestamp()) - self.window_s
        while self.buckets and self.buckets[0][0] <= cutoff:
            self.buckets.popleft()
        return sum(n for _, n in self.buckets)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, ...], Any] = {}
        labels = ["namespace", "model"]
        self.requests = Counter(
            "gpucloud_gateway_requests",
            "Requests proxied, by response status code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gpucloud_gateway_request_duration_seconds",
            "Request runtime, from forwarding to the last byte of the response.",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.tokens = Counter(
            "gpucloud_gateway_tokens",
            "Tokens reported in responses' usage.",
            [*labels, "type"],
            registry=self.registry,
        )
        self.images = Counter(
            "gpucloud_gateway_images", "Images generated.", labels, registry=self.registry
        )
        self.videos = Counter(
            "gpucloud_gateway_videos", "Videos generated.", labels, registry=self.registry
        )
        self.in_flight = Gauge(
            "gpucloud_gateway_in_flight", "Requests in flight.", labels, registry=self.registry
        )
        self.wakes = Counter(
            "gpucloud_gateway_wakes",
            "Cold-start wakes, by outcome.",
            [*labels, "outcome"],
            registry=self.registry,
        )

    def child(self, metric: str, *labels: str) -> Any:
        """``<metric>.labels(*labels)``, looked up once: several per request otherwise."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, metric).labels(*labels)
        return found


class Gateway:
    def __init__(
        self,
        models: list[ModelPlan],
        endpoints: EndpointSource,
        *,
        scaler: Scaler | None = None,
        recorder: Recorder | None = None,
        clock: Clock | None = None,
        wake_timeout_s: float = 120.0,
        retry_after_s: int = 30,
        window_s: float = 600.0,
        callers: Callers | None = None,
        peers: Callable[[], list[str]] | None = None,
        upstream_timeout_s: float = 600.0,
    ) -> None:
        self.models: dict[str, ModelPlan] = {}
        self.window_s = window_s
        self.stats: dict[str, ModelStats] = {}
        self.set_models(models)
        self.endpoints = endpoints
        self.scaler = scaler or NoScaler()
        self.recorder = recorder
        self.clock = clock or SystemClock()
        self.wake_timeout_s = wake_timeout_s
        self.retry_after_s = retry_after_s
        # None: callers are not authenticated (development only; the owner pays).
        self.callers = callers
        # The base URLs of every gateway replica (this one included): /v1/stats sums them.
        self.peers = peers
        self.metrics = Metrics()
        self.replica_in_flight: dict[str, int] = {}
        self._wakes: dict[str, asyncio.Task[list[str]]] = {}
        self._rr = 0
        # Request ids: a random 64-bit prefix per process and a counter (unique like a
        # uuid4, the ledger's key with the model; without a system call per request).
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count()
        self.upstream_timeout_s = upstream_timeout_s
        self._pool: UpstreamPool | None = None
        # Readiness: each check names what is not ready yet (None: ready). Liveness
        # (/healthz) never looks at these: a gateway waiting for its first listing is
        # alive, and restarting it would not help.
        self.readiness: list[Callable[[], str | None]] = []

    def pool(self) -> UpstreamPool:
        """The upstream client (``gpucloud_gateway.upstream``): bodies pass through
        undecoded, no header is added that the caller did not send but Host and
        Content-Length (no Accept-Encoding: usage stays readable), no cookie is kept
        (a cookie a replica sets goes back to its caller only, as a header)."""
        if self._pool is None:
            self._pool = UpstreamPool(
                limit=1000, connect_timeout_s=5.0, read_timeout_s=self.upstream_timeout_s
            )
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self.callers is not None:
            await self.callers.aclose()
        await self.scaler.close()

    def restore_stats(
        self,
        arrivals: list[tuple[str, datetime]],
        totals: dict[str, tuple[int, datetime | None]],
    ) -> None:
        """Rebuild the request counts from durable usage (at startup: a restarted gateway
        must not report a busy model as idle). ``arrivals`` oldest first."""
        for key, at in arrivals:
            self.stats.setdefault(key, ModelStats(self.window_s)).arrive(at)
        for key, (total, last) in totals.items():
            s = self.stats.setdefault(key, ModelStats(self.window_s))
            s.total = total
            s.last_request_at = last

    def set_models(self, models: list[ModelPlan]) -> None:
        """Replace the served models (from the config, or the cluster's ModelDeployments).
        Counters of a model that stays are kept."""
        self.models = {m.key: m for m in models}
        for key in self.models:
            self.stats.setdefault(key, ModelStats(self.window_s))

    def _request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    # -- replicas and cold start -----------------------------------------------------------
    def pick(self, urls: list[str]) -> str:
        """The replica with the fewest requests in flight; ties rotate."""
        self._rr += 1
        n = len(urls)
        if n == 1:
            return urls[0]
        order = [urls[(self._rr + i) % n] for i in range(n)]
        return min(order, key=lambda u: self.replica_in_flight.get(u, 0))

    async def _wake(self, plan: ModelPlan) -> list[str]:
        labels = (plan.namespace, plan.name)
        await self.scaler.wake(plan.namespace, plan.name)
        deadline = time.monotonic() + self.wake_timeout_s
        delay = 0.01
        while time.monotonic() < deadline:
            urls = self.endpoints.endpoints(plan.namespace, plan.name)
            if urls:
                self.metrics.wakes.labels(*labels, "ready").inc()
                return urls
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        self.metrics.wakes.labels(*labels, "timeout").inc()
        raise WakeTimeout(plan.key)

    async def replicas(self, plan: ModelPlan) -> list[str]:
        urls = self.endpoints.endpoints(plan.namespace, plan.name)
        if urls:
            return urls
        task = self._wakes.get(plan.key)
        if task is None or task.done():
            task = asyncio.create_task(self._wake(plan))
            self._wakes[plan.key] = task
        stats = self.stats[plan.key]
        stats.queued += 1
        try:
            return await asyncio.shield(task)
        finally:
            stats.queued -= 1

    # -- HTTP handlers -------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request) -> Response:
        """200 once the model list, the replicas' endpoints and the usage outbox are
        there; 503 naming what is not, so no request is routed to a gateway that would
        answer 404 for a model it has not listed yet, or could not record usage."""
        waiting = [problem for check in self.readiness if (problem := check()) is not None]
        return JSONResponse({"ready": not waiting, "waiting": waiting}, 503 if waiting else 200)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def stats_endpoint(self, request: Request) -> Response:
        """What the operator's autoscaler reads: volume, last request, in flight. With
        peers, the sum over all gateway replicas (``?scope=local``: this one only)."""
        if self.peers is not None and request.query_params.get("scope") != "local":
            return await self._cluster_stats()
        return JSONResponse(self.local_stats())

    async def _cluster_stats(self) -> Response:
        urls = self.peers() if self.peers is not None else []
        if not urls:
            return self._error(503, "stats: no gateway replica is known yet (peers empty)")
        pool = self.pool()

        async def one(url: str) -> dict[str, Any]:
            async with asyncio.timeout(5):
                resp = await pool.request("GET", url, "/v1/stats?scope=local", [], b"")
                try:
                    body = b"".join([c async for c in resp.chunks()])
                finally:
                    resp.release()
            if resp.status != 200:
                raise UpstreamError(f"answered {resp.status}")
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise UpstreamError("not a JSON object")
            return doc

        results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
        for url, res in zip(urls, results, strict=True):
            if isinstance(res, BaseException):
                # A partial sum would scale on a fraction of the load: refuse, the
                # autoscaler holds on missing stats.
                return self._error(503, f"stats: gateway replica {url} did not answer: {res}")
        docs = [r for r in results if isinstance(r, dict)]
        return JSONResponse(sum_stats(docs), headers={"X-Gpucloud-Gateways": str(len(docs))})

    def local_stats(self) -> dict[str, Any]:
        now = self.clock.now()
        out = {}
        for key, s in self.stats.items():
            plan = self.models.get(key)
            if plan is None:
                continue
            out[key] = {
                "requestsLastWindow": s.in_window(now),
                "requestsTotal": s.total,
                "lastRequestAt": s.last_request_at.isoformat() if s.last_request_at else None,
                "inFlight": s.in_flight,
                "queued": s.queued,
                "replicas": {
                    u: self.replica_in_flight.get(u, 0)
                    for u in self.endpoints.endpoints(plan.namespace, plan.name)
                },
            }
        return out

    def _error(self, status: int, message: str, **headers: str) -> Response:
        return JSONResponse({"error": {"message": message, "code": status}}, status, headers)

    async def proxy(self, request: Request) -> Response:
        ns, model = request.path_params["namespace"], request.path_params["model"]
        plan = self.models.get(f"{ns}/{model}")
        if plan is None:
            return self._error(404, f"no model {model!r} in namespace {ns!r}")
        caller = None
        if self.callers is not None:
            try:
                caller = await self.callers.check(plan, request.headers.get("authorization"))
            except CallerError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
                self.metrics.child("requests", ns, model, str(exc.status)).inc()
                return self._error(exc.status, exc.message, **extra)
        stats = self.stats[plan.key]
        arrived = self.clock.now()
        stats.arrive(arrived)
        stats.in_flight += 1
        gauge = self.metrics.child("in_flight", ns, model)
        gauge.inc()
        response = None
        try:
            response = await self._forward(request, plan, arrived, caller)
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # else the relay's finish does it
                stats.in_flight -= 1
                gauge.dec()

    async def _forward(
        self, request: Request, plan: ModelPlan, arrived: datetime, caller: Caller | None
    ) -> Response:
        ns, model = plan.namespace, plan.name
        request_id = self._request_id()
        path = "/" + request.path_params.get("path", "")
        body = await request.body()
        if plan.rule is Rule.OFFICIAL and body[:1] == b"{" and b'"stream"' in body:
            body = _ask_for_stream_usage(body)
        try:
            urls = await self.replicas(plan)
        except WakeTimeout:
            self.metrics.child("requests", ns, model, "503").inc()
            return self._error(
                503,
                f"model {plan.key} is starting from cold and was not ready within "
                f"{self.wake_timeout_s:g}s; retry later",
                **{"Retry-After": str(self.retry_after_s)},
            )
        # The caller's token stays here: a public model runs someone else's code.
        drop = DROP_AUTHENTICATED if self.callers is not None else DROP_ALWAYS
        headers = [(k, v) for k, v in request.headers.items() if k not in drop]
        headers.append((REQUEST_ID_HEADER, request_id))
        payer = caller.account if caller is not None else None
        started = time.perf_counter()
        upstream = None
        url = ""
        pool = self.pool()
        query = request.scope["query_string"]  # as sent (request.url builds a URL object)
        target = path + ("?" + query.decode("latin-1") if query else "")
        for attempt in range(2):  # a refused connection is retried once on another replica
            url = self.pick(urls)
            try:
                upstream = await pool.request(request.method, url, target, headers, body)
                break
            except ConnectError:
                if attempt == 1 or len(urls) < 2:
                    break
                urls = [u for u in urls if u != url]
            except UpstreamError as exc:
                log.warning("request %s to %s failed: %s", request_id, url, exc)
                break
        if upstream is None:
            self.metrics.child("requests", ns, model, "502").inc()
            return self._error(502, f"no replica of {plan.key} answered the request")
        self.replica_in_flight[url] = self.replica_in_flight.get(url, 0) + 1
        tap = UsageTap(path, upstream.content_type)
        raw_headers = [
            (lk, v) for k, v in upstream.raw_headers if (lk := k.lower()) not in HOP_BY_HOP_RAW
        ]
        raw_headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))

        bounded = upstream.content_length is not None and not tap.sse
        event: UsageEvent | None = None  # recorded (durably) before the last bytes
        finished = False

        async def settle() -> None:
            """The response is complete upstream: record its usage durably before the
            caller gets the last bytes. If that fails the caller gets no complete
            answer (the response is cut): no answer goes out unbilled."""
            nonlocal event
            runtime_ms = int((time.perf_counter() - started) * 1000)
            event = self._event(plan, request_id, arrived, runtime_ms, upstream.status, tap)
            if self.recorder is not None:
                await self.recorder.record(plan, event, payer)

        def finish() -> None:
            """Once per request, whichever way it ends (complete, client gone, upstream
            gone): free the slot; a cut response records the usage delivered up to now."""
            nonlocal finished
            if finished:
                return
            finished = True
            upstream.release()  # complete: pooled; cut short: closed, the replica stops
            left = self.replica_in_flight[url] - 1
            if left:
                self.replica_in_flight[url] = left
            else:  # replicas come and go: keep no entry for an idle one
                del self.replica_in_flight[url]
            self.stats[plan.key].in_flight -= 1
            self.metrics.child("in_flight", ns, model).dec()
            if event is None:  # cut: nobody waits for this record
                runtime_ms = int((time.perf_counter() - started) * 1000)
                cut = self._event(plan, request_id, arrived, runtime_ms, upstream.status, tap)
                if self.recorder is not None:
                    self.recorder.record_later(plan, cut, payer)

        async def relay() -> AsyncIterator[bytes]:
            sent = 0
            try:
                async for chunk in upstream.chunks():
                    sent += len(chunk)
                    last = (
                        sent >= (upstream.content_length or 0)
                        if bounded
                        else tap.ends_stream(chunk)
                    )
                    if last and event is None:
                        tap.feed(chunk)  # about to be sent: its usage is the rest's
                        await settle()
                        yield chunk
                        continue
                    yield chunk
                    tap.feed(chunk)  # after the yield: only what was sent is counted
                if event is None:  # a chunked body: settle before its terminating chunk
                    await settle()
            except UpstreamError as exc:
                # The status line is sent already: all we can do is end the stream early.
                log.warning("response of request %s broke off: %s", request_id, exc)
            finally:
                finish()

        # A body of known length ends by itself: relay it without Starlette's per-response
        # disconnect watcher (a task group per request). An open-ended stream (SSE,
        # chunked) keeps the watcher, so a client that leaves stops the generation.
        response: OpenRelay
        if bounded:
            response = BoundedRelay(relay(), status_code=upstream.status)
            response.length = upstream.content_length or 0
        else:
            response = OpenRelay(relay(), status_code=upstream.status)
        response.finish = finish  # the relay may never be resumed after a disconnect
        response.raw_headers = raw_headers  # as sent: repeated headers (Set-Cookie) kept
        return response

    def _event(
        self,
        plan: ModelPlan,
        request_id: str,
        arrived: datetime,
        runtime_ms: int,
        status: int,
        tap: UsageTap,
    ) -> UsageEvent:
        """The request's usage event; counted in the metrics once, here."""
        counts = tap.result()
        ns, model = plan.namespace, plan.name
        m = self.metrics
        m.child("requests", ns, model, str(status)).inc()
        m.child("latency", ns, model).observe(runtime_ms / 1000)
        if counts.prompt_tokens:
            m.child("tokens", ns, model, "prompt").inc(counts.prompt_tokens)
        if counts.completion_tokens:
            m.child("tokens", ns, model, "completion").inc(counts.completion_tokens)
        if counts.images:
            m.child("images", ns, model).inc(counts.images)
        if counts.videos:
            m.child("videos", ns, model).inc(counts.videos)
        return UsageEvent(
            request_id=request_id,
            namespace=ns,
            model=model,
            at=arrived,
            runtime_ms=runtime_ms,
            status=status,
            prompt_tokens=counts.prompt_tokens,
            completion_tokens=counts.completion_tokens,
            images=counts.images,
            videos=counts.videos,
        )

    def app(
        self,
        on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
        on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            for hook in on_startup:
                await hook()
            yield
            for hook in on_shutdown:
                await hook()
            await self.aclose()

        return ProxyFastPath(
            Starlette(
                routes=[
                    Route("/healthz", self.healthz),
                    Route("/readyz", self.readyz),
                    Route("/{namespace}/{model}/{path:path}", self.proxy, methods=PROXY_METHODS),
                ],
                lifespan=lifespan,
            ),
            self.proxy,
        )

    def ops_app(self) -> Starlette:
        """``/metrics`` and ``/v1/stats`` (model names, traffic, replica pod IPs) for the
        operator, the other replicas and Prometheus, on their own port: not on the port
        tenants and the internet reach (gpucloud.serving)."""
        return Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics_endpoint),
                Route("/v1/stats", self.stats_endpoint),
            ]
        )


PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")


class ProxyFastPath:
    """Sends a proxied request (``/<namespace>/<model>/<path>``) straight to the proxy
    handler, without Starlette's router and middleware stack (about a tenth of the
    gateway's CPU per request); everything else (probes, lifespan, paths the proxy route
    does not match, methods it does not take) goes to the Starlette app, whose route
    table stays the reference. As Starlette's error middleware, an exception before the
    response started answers 500, and is raised on for the server to log."""

    def __init__(self, app: Starlette, proxy: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = app
        self.proxy = proxy
        self.methods = frozenset(PROXY_METHODS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return await self.app(scope, receive, send)
        parts = scope["path"].split("/", 3)  # "", namespace, model, path
        if len(parts) != 4 or not parts[1] or not parts[2] or scope.get("root_path"):
            return await self.app(scope, receive, send)
        scope = {
            **scope,
            "app": self.app,
            "path_params": {"namespace": parts[1], "model": parts[2], "path": parts[3]},
        }
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await self.proxy(Request(scope, receive, send))
            await response(scope, receive, tracked)
        except Exception:
            if not started:
                await Response("Internal Server Error", 500, media_type="text/plain")(
                    scope, receive, send
                )
            raise


class OpenRelay(StreamingResponse):
    """Streams an open-ended body; ``finish`` runs however the response ends: a client
    that leaves mid-stream may leave the relay generator suspended for good."""

    finish: Callable[[], None] = staticmethod(lambda: None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.finish()


class BoundedRelay(OpenRelay):
    """Streams a body of known length straight to the client (see ``_forward``); its
    last bytes go out as the response's last message (not followed by an empty one)."""

    length = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            left, ended = self.length, False
            async for chunk in self.body_iterator:
                left -= len(chunk)
                ended = left <= 0
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if not ended:  # an empty body, or one that broke off (the server then cuts it)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.finish()


def sum_stats(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/v1/stats`` of several gateway replicas as one: counts add up, the last
    request is the latest, in-flight counts per model replica add up."""
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for key, s in doc.items():
            if not isinstance(s, dict):
                continue
            acc = out.setdefault(
                key,
                {
                    "requestsLastWindow": 0,
                    "requestsTotal": 0,
                    "lastRequestAt": None,
                    "inFlight": 0,
                    "queued": 0,
                    "replicas": {},
                },
            )
            for field_ in ("requestsLastWindow", "requestsTotal", "inFlight", "queued"):
                acc[field_] += int(s.get(field_) or 0)
            last = s.get("lastRequestAt")
            if last and (
                acc["lastRequestAt"] is None
                or datetime.fromisoformat(last) > datetime.fromisoformat(acc["lastRequestAt"])
            ):
                acc["lastRequestAt"] = last
            for url, n in (s.get("replicas") or {}).items():
                acc["replicas"][url] = acc["replicas"].get(url, 0) + int(n)
    return out


def _ask_for_stream_usage(body: bytes) -> bytes:
    """A streamed chat completion reports usage only when asked: ask, so that an official
    model's tokens can be billed (the client sees one extra chunk with empty choices)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return body
    opts = doc.get("stream_options")
    opts = opts if isinstance(opts, dict) else {}
    if opts.get("include_usage") is True:
        return body
    doc["stream_options"] = {**opts, "include_usage": True}
    return json.dumps(doc).encode()
