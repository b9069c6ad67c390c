"""Console sessions: the caller's Kubernetes token in a cookie, checked like a bearer token.

The login form takes a token (a ServiceAccount's, from ``kubectl create token``, or any
token the API server's TokenReview accepts); the session cookie holds that token, so a
session is exactly as valid as its token (expired or revoked: back to the login page)
and any API replica can serve it. The cookie is HttpOnly (no script reads it),
SameSite=Strict (no other site's page sends it), Secure when the request came over TLS
(directly or through a proxy that says so), and scoped to the console's path. The token
never appears in a URL, a page or a log.

CSRF: every state-changing form carries a per-session token, an HMAC of the session's
token (so it needs no server-side state and dies with the session), compared in constant
time. The login form, which has no session yet, carries a random value that must equal a
SameSite=Strict cookie set with the form.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response

from gpucloud.api.auth import AuthError, Principal
from gpucloud.api.deps import State

SESSION_COOKIE = "gpucloud_session"
LOGIN_COOKIE = "gpucloud_login"
# A cookie holds at most 4096 bytes with its name and attributes.
MAX_TOKEN_CHARS = 3500
# Kubernetes tokens (JWTs, bootstrap and static tokens) are written with these.
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")


class LoginRequired(Exception):
    """No session, or its token is no longer accepted; ``message`` says which."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class ConsoleError(Exception):
    """A refusal shown as a page (or JSON for the live endpoints): status and detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Viewer:
    """The signed-in caller, and the CSRF token of their session."""

    principal: Principal
    csrf: str
    is_admin: bool

    @property
    def username(self) -> str:
        return self.principal.username


def console_path(request: Request, path: str = "") -> str:
    """An absolute path inside the console (honours the app's root path behind a proxy)."""
    return f"{request.scope.get('root_path', '')}/console{path}"


def csrf_for(token: str) -> str:
    return hmac.new(token.encode(), b"gpucloud-console-csrf", hashlib.sha256).hexdigest()


def check_token_text(token: str) -> str:
    """The token as typed, trimmed, or ConsoleError naming the rule it breaks."""
    token = token.strip()
    if not token:
        raise ConsoleError(422, "token: required")
    if len(token) > MAX_TOKEN_CHARS:
        raise ConsoleError(422, f"token: longer than {MAX_TOKEN_CHARS} characters")
    if not _TOKEN.match(token):
        raise ConsoleError(
            422, "token: only letters, digits and . _ ~ + / = - (paste the token alone)"
        )
    return token


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def check_csrf(viewer: Viewer, submitted: object) -> None:
    if not isinstance(submitted, str) or not same(submitted, viewer.csrf):
        raise ConsoleError(403, "csrf: the form is not from this session; reload the page")


async def current_viewer(request: Request, state: State) -> Viewer:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired()
    try:
        principal = await state.settings.authenticator.authenticate(token)
    except AuthError as exc:
        raise ConsoleError(exc.status, exc.detail) from None
    if principal is None:
        raise LoginRequired("Your session ended: its token expired or was revoked.")
    return Viewer(principal, csrf_for(token), state.settings.policy.is_admin(principal))


Console = Annotated[Viewer, Depends(current_viewer)]


def _secure(request: Request) -> bool:
    # A client-supplied X-Forwarded-Proto can only make its own cookie stricter.
    return (
        request.url.scheme == "https"
        or request.headers.get("x-forwarded-proto", "").lower() == "https"
    )


def start_session(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, token, path=console_path(request), httponly=True,
        secure=_secure(request), samesite="strict",
    )  # fmt: skip
    response.delete_cookie(LOGIN_COOKIE, path=console_path(request, "/login"))


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=console_path(request), httponly=True,
        secure=_secure(request), samesite="strict",
    )  # fmt: skip


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def set_login_nonce(request: Request, response: Response, nonce: str) -> None:
    """The login form's anti-forgery value, as a cookie beside the form."""
    response.set_cookie(
        LOGIN_COOKIE, nonce, path=console_path(request, "/login"), httponly=True,
        secure=_secure(request), samesite="strict", max_age=3600,
    )  # fmt: skip


def safe_next(request: Request, value: object) -> str:
    """Where to go after logging in: a console path, never another site."""
    home = console_path(request, "/")
    if not isinstance(value, str) or not value.startswith(console_path(request, "/")):
        return home
    if "//" in value or "\\" in value or any(ord(c) < 0x20 for c in value):
        return home
    return value
