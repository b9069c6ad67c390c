"""What every request passes before a route reads its body (issue 16, findings 5 and 6).

``RequestGuard`` (pure ASGI, outermost): a size limit per route, enforced on the
Content-Length and again on the bytes actually received (chunked bodies); the bearer
token checked before the body is read, for every route that needs one; no NUL or other
control character in the path or the query. ``StrictRoute`` parses JSON bodies strictly:
no NaN, Infinity or overflowing numbers, bounded nesting, no NUL in any string. Each
refusal is a 4xx whose detail names what broke which rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pydantic_core
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpucloud.api.auth import AuthError

SMALL_BODY = 64 * 1024  # every JSON body but usage batches and voucher files
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PCT_CONTROL = re.compile(r"%(?:[01][0-9a-fA-F]|7[fF])")


def parse_json(raw: bytes) -> Any:
    """JSON as the API accepts it, or HTTPException(400) naming the rule it breaks."""
    try:
        value = pydantic_core.from_json(raw, allow_inf_nan=False)  # nesting limited too
    except ValueError as exc:
        raise HTTPException(400, f"body: not valid JSON ({exc})") from None
    problem = _check(value, "body")
    if problem is not None:
        raise HTTPException(400, problem)
    return value


def _check(value: Any, where: str) -> str | None:
    """The first number that is not finite or string that holds a NUL, by JSON path."""
    stack = [(value, where)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return f"{path}: a number out of range"
        if isinstance(v, str) and "\x00" in v:
            return f"{path}: must not contain NUL characters"
        if isinstance(v, dict):
            stack.extend((item, f"{path}.{key}") for key, item in v.items())
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))
    return None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """Routes whose JSON bodies are parsed by ``parse_json``."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Any:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class RequestGuard:
    """``limits``: (path regex, method, bytes); other requests get ``SMALL_BODY``.
    ``open_paths``: routes without a bearer token (probes, the spec, the price book,
    signed payment callbacks)."""

    def __init__(
        self,
        app: ASGIApp,
        limits: list[tuple[str, str, int]],
        open_paths: list[str],
    ) -> None:
        self.app = app
        self.limits = [(re.compile(p), m, n) for p, m, n in limits]
        self.open = [re.compile(p) for p in open_paths]

    def _limit(self, method: str, path: str) -> int:
        for pattern, m, n in self.limits:
            if m == method and pattern.fullmatch(path):
                return n
        return SMALL_BODY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        if _CONTROL.search(path) or _PCT_CONTROL.search(query) or _CONTROL.search(query):
            await _reply(scope, send, 400, "path or query: must not contain control characters")
            return
        limit = self._limit(method, path)
        length = _content_length(scope)
        if length is None or length > limit:
            if length is None:
                await _reply(scope, send, 400, "Content-Length: must be a number of bytes")
            else:
                await _reply(scope, send, 413, f"body: larger than {limit} bytes")
            return
        if not any(p.fullmatch(path) for p in self.open):
            denied = await _authenticate(scope)
            if denied is not None:
                await _reply(scope, send, *denied)
                return
        received, over = 0, False

        async def bounded() -> Message:
            # Past the limit the app sees the client gone (it stops reading) and its
            # answer is replaced by a 413 (an exception here would reach the app wrapped
            # by its middleware and come out as a 400 or 500).
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        replied = False

        async def guarded_send(message: Message) -> None:
            nonlocal replied
            if not over:
                await send(message)
            elif not replied:
                replied = True
                await _reply(scope, send, 413, f"body: larger than {limit} bytes")

        try:
            await self.app(scope, bounded, guarded_send)
        except Exception:
            if not over:
                raise
            await guarded_send({"type": "http.response.start"})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1")
            return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None
    return 0


async def _authenticate(scope: Scope) -> tuple[int, str, dict[str, str]] | None:
    """Check the bearer token (the principal goes to request.state); the refusal if any."""
    header = ""
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            header = value.decode("latin-1")
    scheme, _, token = header.partition(" ")
    bearer = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        return 401, "Authorization: a Bearer token is required", bearer
    state = scope["app"].state.gpucloud
    try:
        principal = await state.settings.authenticator.authenticate(token.strip())
    except AuthError as exc:
        return exc.status, exc.detail, {}
    if principal is None:
        return 401, "Authorization: the token is not valid", bearer
    scope.setdefault("state", {})["principal"] = principal
    return None


async def _reply(
    scope: Scope, send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
