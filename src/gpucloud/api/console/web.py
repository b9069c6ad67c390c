"""Rendering: the Jinja2 templates (autoescaped: every tenant-controlled string is text,
never markup), the security headers of every console response, and error pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from gpucloud.api.console.session import ConsoleError, LoginRequired, Viewer, console_path

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
# .html templates are autoescaped by Starlette's environment; make sure of it.
assert templates.env.autoescape is not False

# Scripts and styles from this origin only (no inline script can run), no plugins but the
# voucher PDF's <object>, no framing by other sites, forms post here only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'self'; frame-src 'self'; connect-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "SAMEORIGIN",
    "Cache-Control": "no-store",  # balances and vouchers are private
}


def page(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    viewer: Viewer | None = None,
    status: int = 200,
) -> Response:
    ctx = {
        "base": console_path(request),
        "viewer": viewer,
        "csrf": viewer.csrf if viewer is not None else "",
        **context,
    }
    return templates.TemplateResponse(request, name, ctx, status_code=status)


def wants_json(request: Request) -> bool:
    return request.url.path.endswith(".json")


def login_redirect(request: Request, exc: LoginRequired) -> Response:
    """Pages go to the login form (coming back here after); the live endpoints answer
    401 so the page's script can go there itself."""
    login = console_path(request, "/login")
    if wants_json(request):
        return JSONResponse({"detail": "log in again", "login": login}, status_code=401)
    target = request.url.path if request.method == "GET" else console_path(request, "/")
    query = {"next": target, **({"ended": "1"} if exc.message else {})}
    url = request.url.replace(path=login, query="").include_query_params(**query)
    return RedirectResponse(f"{url.path}?{url.query}", status_code=303)


def error_page(request: Request, exc: ConsoleError, viewer: Viewer | None = None) -> Response:
    if wants_json(request):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)
    return page(
        request, "error.html", {"title": _TITLES.get(exc.status, "Error"), "detail": exc.detail},
        viewer=viewer, status=exc.status,
    )  # fmt: skip


_TITLES = {
    401: "Not signed in",
    403: "Not allowed",
    404: "Not found",
    409: "Refused",
    413: "Too large",
    422: "Check the form",
    503: "Try again shortly",
}
