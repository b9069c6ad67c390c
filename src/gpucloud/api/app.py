"""The metering/billing HTTP API: ``create_app(settings)``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from gpucloud.api import (
    console,
    routes_accounts,
    routes_image_copies,
    routes_recharge,
    routes_usage,
    routes_wipes,
)
from gpucloud.api.deps import AppState, State
from gpucloud.api.errors import STATUS, refusal
from gpucloud.api.gate import FairLock
from gpucloud.api.guard import SMALL_BODY, RequestGuard
from gpucloud.api.metrics import ApiMetrics
from gpucloud.api.rating import RatingLoop
from gpucloud.api.schemas import Problem
from gpucloud.api.settings import Settings
from gpucloud.crd import pricebook as pricebooks
from gpucloud.ledger import (
    open_ledger,
)
from gpucloud.recharge.provider import MAX_NOTICE_BYTES
from gpucloud.usage import UsageBatch

API_VERSION = "1.0.0"


def create_app(settings: Settings) -> FastAPI:
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ledger = await run_in_threadpool(open_ledger, settings.database_url, clock=settings.clock)
        gate = FairLock()
        rating = RatingLoop(ledger, settings.clock, metrics, settings.rating_interval_s, gate)
        group = routes_usage.ingest_group(ledger, settings, metrics, gate)
        app.state.gpucloud = AppState(settings, ledger, metrics, rating, gate, group)
        rating.start()
        try:
            yield
        finally:
            await rating.stop()
            await settings.authenticator.aclose()
            await settings.membership.aclose()
            await settings.cluster.aclose()
            ledger.close()

    app = FastAPI(
        title="gpucloud metering and billing API",
        version=API_VERSION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.include_router(routes_usage.router)
    app.include_router(routes_accounts.router)
    app.include_router(routes_recharge.router)
    app.include_router(routes_wipes.router)
    app.include_router(routes_image_copies.router)
    console.install(app)
    _add_ops_routes(app)
    _add_error_handlers(app)
    _add_latency_middleware(app, metrics)
    voucher_body = settings.max_voucher_bytes * 4 // 3 + SMALL_BODY  # base64 + the fields
    app.add_middleware(
        RequestGuard,
        limits=[
            (r"/v1/usage", "POST", routes_usage.MAX_BODY_BYTES),
            (r"/v1/accounts/[^/]+/recharges/bank-transfer", "POST", voucher_body),
            (console.UPLOAD_PATH, "POST", settings.max_voucher_bytes + SMALL_BODY),
            (r"/v1/payments/[^/]+/callback", "POST", MAX_NOTICE_BYTES),
        ],
        open_paths=[
            r"/healthz", r"/readyz", r"/openapi\.json", r"/docs.*", r"/v1/pricebook",
            r"/v1/payments/[^/]+/callback", *console.OPEN_PATHS,
        ],
    )  # fmt: skip
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _ready(state: AppState | None) -> JSONResponse:
    if state is None:
        return JSONResponse({"detail": "starting"}, status_code=503)
    try:
        with state.ledger.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return JSONResponse({"detail": f"database: {type(exc).__name__}"}, status_code=503)
    return JSONResponse({"status": "ready"})


def ops_app(app: FastAPI) -> Starlette:
    """The operational endpoints of ``app``, for its own port (gpucloud.serving):
    ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``. Not on the main port: the
    metrics name accounts, routes and volumes, for operators only."""

    def state() -> AppState | None:
        return getattr(app.state, "gpucloud", None)

    async def metrics(_: Request) -> Response:
        s = state()
        if s is None:
            return Response("starting\n", status_code=503)
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        return await run_in_threadpool(_ready, state())

    return Starlette(
        routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)]
    )


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": Problem}})
    def readyz(state: State) -> JSONResponse:
        """The database answers."""
        return _ready(state)

    @app.get("/v1/pricebook", tags=["pricing"])
    def pricebook(state: State) -> dict[str, Any]:
        """The PriceBook spec in force (camelCase, decimals as strings)."""
        path = state.settings.pricebook_path
        if path is None:
            raise HTTPException(404, "no price book is configured")
        doc = yaml.safe_load(path.read_text())
        return pricebooks.read(doc).dump()


def _add_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, detail = refusal(exc)
        body: dict[str, Any] = {"detail": detail}
        reason = getattr(exc, "reason", None)
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=status)

    for cls, _ in STATUS:
        app.add_exception_handler(cls, handle)


def _add_latency_middleware(app: FastAPI, metrics: ApiMetrics) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.request_latency.labels(request.method, template, response.status_code).observe(
            time.perf_counter() - start
        )
        return response


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=__doc__
        )
        # POST /v1/usage parses its body itself (per-record errors); publish the schema.
        batch = UsageBatch.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(batch.pop("$defs", {}))
        schemas["UsageBatch"] = batch
        app.openapi_schema = spec
    return app.openapi_schema
