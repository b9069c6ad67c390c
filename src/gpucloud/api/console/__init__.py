"""The billing console: server-rendered pages for tenants and admins, served by the API
under ``/console`` (docs/console.md).

Tenants see their balance, available balance, runway and arrears countdown, their
instances and model deployments with what each has cost, recharge online (QR code) or
by bank transfer (voucher upload), and read and download the ledger's statement.
Admins review bank-transfer vouchers with the file beside the figures. Sign-in is the
API's own: a Kubernetes token checked by TokenReview (``session``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpucloud.api.console import pages, payments, review
from gpucloud.api.console.session import ConsoleError, LoginRequired
from gpucloud.api.console.web import HEADERS, HERE, error_page, login_redirect

PREFIX = "/console"
# The RequestGuard's view of the console: no bearer token (the session cookie is checked
# by the pages), and the upload's larger body limit.
OPEN_PATHS = [r"/console(/.*)?"]
UPLOAD_PATH = payments.UPLOAD


def _console(request: Request) -> bool:
    path: str = request.scope["path"]
    return path == PREFIX or path.startswith(PREFIX + "/")


def install(app: FastAPI) -> None:
    """Add the console's routes, static files, error pages and response headers."""
    for router in (pages.router, payments.router, review.router):
        app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")

    async def on_login(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, LoginRequired)
        return login_redirect(request, exc)

    async def on_refusal(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ConsoleError)
        return error_page(request, exc)

    async def on_http(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, StarletteHTTPException)
        if _console(request):
            return error_page(request, ConsoleError(exc.status_code, str(exc.detail)))
        return await http_exception_handler(request, exc)

    async def on_invalid(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        if _console(request):
            where = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
            )
            return error_page(request, ConsoleError(422, where or "the request is not valid"))
        return await request_validation_exception_handler(request, exc)

    app.add_exception_handler(LoginRequired, on_login)
    app.add_exception_handler(ConsoleError, on_refusal)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_invalid)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if _console(request):
            if request.scope["path"].startswith(f"{PREFIX}/static/"):
                response.headers.setdefault("Cache-Control", "public, max-age=300")
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
        return response
