"""Console pages: log in and out, the caller's accounts, an account's overview (and its
live figures), and the ledger's statement for a month."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from gpucloud.api.auth import AuthError
from gpucloud.api.console import session as s
from gpucloud.api.console.overview import my_accounts, overview, require_member
from gpucloud.api.console.session import Console, ConsoleError, console_path
from gpucloud.api.console.web import page
from gpucloud.api.deps import AccountName, State
from gpucloud.api.errors import REFUSALS, refusal
from gpucloud.api.routes_accounts import statement_response
from gpucloud.billing.money import format_money
from gpucloud.billing.statement import Line, Period, Statement
from gpucloud.ledger import NotFound
from gpucloud.statements import collect

router = APIRouter(prefix="/console", include_in_schema=False)

KINDS = {"": "all", "recharge": "payments", "refund": "refunds",
         "adjustment": "adjustments", "charge": "charges"}  # fmt: skip


# -- logging in and out ------------------------------------------------------------------
def _login_page(request: Request, next_url: str, message: str, error: str, status: int) -> Any:
    nonce = s.new_nonce()
    # the audience TokenReview requires, for the hint how to mint a token
    audiences = getattr(request.app.state.gpucloud.settings.authenticator, "audiences", None)
    context = {"title": "Log in", "nonce": nonce, "next": next_url, "message": message,
               "error": error, "audience": (audiences or [""])[0]}  # fmt: skip
    response = page(request, "login.html", context, status=status)
    s.set_login_nonce(request, response, nonce)
    return response


@router.get("/login")
async def login_form(
    request: Request,
    state: State,
    next: Annotated[str, Query(max_length=2000)] = "",
    ended: Annotated[str, Query(max_length=1)] = "",
    bye: Annotated[str, Query(max_length=1)] = "",
) -> Any:
    next_url = s.safe_next(request, next)
    message = "Your session ended: its token expired or was revoked." if ended else ""
    message = "You are logged out." if bye else message
    stale = False
    if token := request.cookies.get(s.SESSION_COOKIE):
        try:
            if await state.settings.authenticator.authenticate(token) is not None:
                return RedirectResponse(next_url, status_code=303)  # signed in already
            stale = True
        except AuthError:
            pass  # the cluster cannot say now: show the form, keep the cookie
    response = _login_page(request, next_url, message, "", 200)
    if stale:
        s.end_session(request, response)
    return response


@router.post("/login")
async def login(request: Request, state: State) -> Any:
    form = await request.form(max_files=0, max_fields=5)
    next_url = s.safe_next(request, form.get("next"))
    if not s.same(request.cookies.get(s.LOGIN_COOKIE), _text(form.get("nonce"))):
        error = "The login form expired or came from elsewhere: enter the token again."
        return _login_page(request, next_url, "", error, 403)
    try:
        token = s.check_token_text(_text(form.get("token")))
        principal = await state.settings.authenticator.authenticate(token)
    except ConsoleError as exc:
        return _login_page(request, next_url, "", exc.detail, exc.status)
    except AuthError as exc:
        return _login_page(request, next_url, "", exc.detail, exc.status)
    if principal is None:
        error = "This token was not accepted: it is expired, revoked or not from this cluster."
        return _login_page(request, next_url, "", error, 401)
    response = RedirectResponse(next_url, status_code=303)
    s.start_session(request, response, token)
    return response


@router.post("/logout")
async def logout(request: Request, viewer: Console) -> Any:
    form = await request.form(max_files=0, max_fields=5)
    s.check_csrf(viewer, form.get("csrf"))
    response = RedirectResponse(console_path(request, "/login?bye=1"), status_code=303)
    s.end_session(request, response)
    return response


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


# -- accounts ----------------------------------------------------------------------------
@router.get("")
async def root(request: Request) -> Any:
    return RedirectResponse(console_path(request, "/"), status_code=307)


@router.get("/")
async def home(request: Request, viewer: Console, state: State) -> Any:
    accounts = await my_accounts(state, viewer)
    if len(accounts) == 1 and not viewer.is_admin:
        return RedirectResponse(console_path(request, f"/a/{accounts[0][0]}"), status_code=303)
    return page(request, "home.html", {"title": "Your accounts", "accounts": accounts},
                viewer=viewer)  # fmt: skip


async def account_page(
    request: Request, state: State, viewer: s.Viewer, account: str,
    status: int = 200, **extra: Any,
) -> Response:  # fmt: skip
    """The overview; ``extra``: a form's error and what was typed, or a notice."""
    base = console_path(request)
    view = await overview(state, account, base)
    providers = state.settings.providers.names()
    context = {
        "title": view["display_name"] or account, "view": view, "providers": providers,
        "live_url": f"{base}/a/{account}/live.json", "poll_s": state.settings.console_poll_s,
        "form": {}, "errors": {}, "notice": "", **extra,
    }  # fmt: skip
    return page(request, "account.html", context, viewer=viewer, status=status)


@router.get("/a/{account}")
async def account_home(
    request: Request,
    account: AccountName,
    viewer: Console,
    state: State,
    voucher: Annotated[str, Query(max_length=64)] = "",
) -> Any:
    await require_member(state, viewer, account)
    notice = ""
    if voucher:
        try:
            v = await run_in_threadpool(state.ledger.get_voucher, voucher)
            if v.account == account:
                notice = f"Voucher {v.voucher_id} submitted: it awaits an admin's review."
        except NotFound:
            pass
    return await account_page(request, state, viewer, account, notice=notice)


@router.get("/a/{account}/live.json")
async def account_live(
    request: Request, account: AccountName, viewer: Console, state: State
) -> JSONResponse:
    await require_member(state, viewer, account)
    return JSONResponse(await overview(state, account, console_path(request)))


# -- statement ---------------------------------------------------------------------------
def _filtered(st: Statement, kind: str, resource: str) -> list[Line]:
    lines = sorted(st.lines, key=lambda line: line.at)
    return [
        line
        for line in lines
        if (not kind or line.kind == kind) and (not resource or (line.resource or "") == resource)
    ]


@router.get("/a/{account}/statement")
async def statement_page(
    request: Request,
    account: AccountName,
    viewer: Console,
    state: State,
    period: Annotated[str, Query(max_length=7)] = "",
    kind: Annotated[str, Query(max_length=20)] = "",
    resource: Annotated[str, Query(max_length=300)] = "",
) -> Any:
    await require_member(state, viewer, account)
    period = period or state.settings.clock.now().strftime("%Y-%m")
    context: dict[str, Any] = {"title": f"Statement of {account}", "account": account,
                               "period": period, "kind": kind, "resource": resource,
                               "kinds": KINDS, "error": "", "st": None}  # fmt: skip
    try:
        if kind not in KINDS:
            raise ConsoleError(422, f"kind: one of {', '.join(k for k in KINDS if k)}, or all")
        st = await run_in_threadpool(collect, state.ledger, account, Period.parse(period))
    except ConsoleError as exc:
        context["error"] = exc.detail
        return page(request, "statement.html", context, viewer=viewer, status=exc.status)
    except REFUSALS as exc:
        code, context["error"] = refusal(exc)
        return page(request, "statement.html", context, viewer=viewer, status=code)
    lines = _filtered(st, kind, resource)
    money = lambda minor: format_money(minor, st.currency)  # noqa: E731
    context |= {
        "st": st,
        "money": money,
        "lines": lines,
        "shown_total": money(sum(line.amount_minor for line in lines)),
        "resources": sorted({line.resource for line in st.lines if line.resource}),
    }
    return page(request, "statement.html", context, viewer=viewer)


@router.get("/a/{account}/statement.{fmt}")
async def statement_download(
    account: AccountName,
    fmt: Annotated[str, Path(pattern=r"^(csv|pdf)$")],
    viewer: Console,
    state: State,
    period: Annotated[str, Query(max_length=7)],
) -> Response:
    await require_member(state, viewer, account)
    try:
        st = await run_in_threadpool(collect, state.ledger, account, Period.parse(period))
    except REFUSALS as exc:
        raise ConsoleError(*refusal(exc)) from None
    return statement_response(st, fmt)
