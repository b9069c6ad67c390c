"""Recharging from the console: an online payment (its QR code, its status as it
changes) and a bank transfer with the voucher file uploaded (multipart). The rules are
the JSON API's (``gpucloud.api.recharges``); this module reads forms and shows results."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from gpucloud.api import recharges
from gpucloud.api.console import session as s
from gpucloud.api.console.overview import order_status, require_member
from gpucloud.api.console.pages import account_page
from gpucloud.api.console.present import when_text
from gpucloud.api.console.session import Console, ConsoleError, console_path
from gpucloud.api.console.web import page
from gpucloud.api.deps import AccountName, AppState, State
from gpucloud.api.errors import REFUSALS, refusal
from gpucloud.api.schemas import AmountText, Text
from gpucloud.billing.money import format_money
from gpucloud.ledger import Order
from gpucloud.recharge.qr import qr_png

router = APIRouter(prefix="/console/a/{account}", include_in_schema=False)
OrderId = Annotated[str, Path(min_length=1, max_length=64)]
UPLOAD = "/console/a/[^/]+/recharge/bank-transfer"  # the RequestGuard's larger limit


class OnlineForm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    amount: AmountText
    provider: Annotated[str, Field(min_length=1, max_length=64)]


class TransferForm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    amount: AmountText
    payer: Text
    bank: Text
    transfer_no: Annotated[str, Field(min_length=1, max_length=100)]


def _errors(exc: ValidationError) -> dict[str, str]:
    """Field -> what is wrong with it (the field named, the rule in words)."""
    out: dict[str, str] = {}
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "form"
        out.setdefault(field, f"{field}: {err['msg']}")
    return out


def _refused(detail: str) -> dict[str, str]:
    """A refusal as a form error, under the field its detail names ("amount: ...")."""
    field, sep, _ = detail.partition(":")
    return {field if sep and " " not in field else "form": detail}


def _fields(form: FormData, names: tuple[str, ...]) -> dict[str, str]:
    return {n: v.strip() for n in names if isinstance(v := form.get(n), str)}


async def _form_page(
    request: Request, state: AppState, viewer: s.Viewer, account: str,
    which: str, typed: dict[str, str], errors: dict[str, str], status: int,
) -> Response:  # fmt: skip
    """The account page again, with the form's errors next to what was typed."""
    return await account_page(
        request, state, viewer, account, status=status, form={which: typed},
        errors={which: errors},
    )  # fmt: skip


# -- online payment ----------------------------------------------------------------------
@router.post("/recharge/online")
async def start_online(
    request: Request, account: AccountName, viewer: Console, state: State
) -> Response:
    await require_member(state, viewer, account)
    form = await request.form(max_files=0, max_fields=10)
    s.check_csrf(viewer, form.get("csrf"))
    typed = _fields(form, ("amount", "provider"))
    typed.setdefault("provider", (state.settings.providers.names() or ["sandbox"])[0])
    try:
        body = OnlineForm.model_validate(typed)
        order = await run_in_threadpool(
            recharges.open_order, state, account, body.amount, None, body.provider,
            viewer.principal,
        )  # fmt: skip
    except ValidationError as exc:
        return await _form_page(request, state, viewer, account, "online", typed, _errors(exc), 422)
    except REFUSALS as exc:
        code, detail = refusal(exc)
        errors = _refused(detail)
        return await _form_page(request, state, viewer, account, "online", typed, errors, code)
    return RedirectResponse(
        console_path(request, f"/a/{account}/orders/{order.order_id}"), status_code=303
    )


def _order_view(state: AppState, account: str, order_id: str) -> dict[str, Any]:
    order: Order = recharges.account_order(state, account, order_id)
    acct = state.ledger.get_account(account)
    return {
        "order_id": order.order_id,
        "amount": format_money(order.amount_minor, acct.currency),
        "status": order_status(order),
        "done": str(order.status) != "pending",
        "paid": str(order.status) == "paid",
        "expires": when_text(order.expires_at),
        "balance": format_money(acct.balance_minor, acct.currency),
        "payment_url": recharges.payment_url(state, order, acct.currency),
    }


async def _order(state: AppState, viewer: s.Viewer, account: str, order_id: str) -> dict[str, Any]:
    """The order as the pages show it, for a member of its account only."""
    await require_member(state, viewer, account)
    try:
        return await run_in_threadpool(_order_view, state, account, order_id)
    except REFUSALS as exc:
        raise ConsoleError(*refusal(exc)) from None


# before the page's route, whose {order_id} would take "ID.json"
@router.get("/orders/{order_id}.json")
async def order_live(
    account: AccountName, order_id: OrderId, viewer: Console, state: State
) -> JSONResponse:
    order = await _order(state, viewer, account, order_id)
    order.pop("payment_url")
    return JSONResponse(order)


@router.get("/orders/{order_id}")
async def order_page(
    request: Request, account: AccountName, order_id: OrderId, viewer: Console, state: State
) -> Response:
    order = await _order(state, viewer, account, order_id)
    base = console_path(request, f"/a/{account}/orders/{order_id}")
    context = {"title": f"Pay {order['amount']}", "account": account, "order": order,
               "live_url": f"{base}.json", "qr_url": f"{base}/qr.png",
               "poll_s": state.settings.console_poll_s}  # fmt: skip
    return page(request, "order.html", context, viewer=viewer)


@router.get("/orders/{order_id}/qr.png")
async def order_qr(
    account: AccountName, order_id: OrderId, viewer: Console, state: State
) -> Response:
    order = await _order(state, viewer, account, order_id)
    return Response(qr_png(order["payment_url"]), media_type="image/png")


# -- bank transfer -----------------------------------------------------------------------
@router.post("/recharge/bank-transfer")
async def submit_transfer(
    request: Request, account: AccountName, viewer: Console, state: State
) -> Response:
    """Authenticated and a member before a byte of the upload is read; the body's size
    is bounded by the RequestGuard (the voucher limit plus the form's fields)."""
    await require_member(state, viewer, account)
    form = await request.form(max_files=1, max_fields=10)
    s.check_csrf(viewer, form.get("csrf"))
    typed = _fields(form, ("amount", "payer", "bank", "transfer_no"))
    upload = form.get("file")
    try:
        body = TransferForm.model_validate(typed)
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise ConsoleError(422, "file: choose the transfer voucher (an image or a PDF)")
        content = await upload.read(state.settings.max_voucher_bytes + 1)
        voucher = await run_in_threadpool(
            recharges.keep_voucher, state, account, body.amount, None, body.payer, body.bank,
            body.transfer_no, content, viewer.principal,
        )  # fmt: skip
    except ValidationError as exc:
        return await _form_page(
            request, state, viewer, account, "transfer", typed, _errors(exc), 422
        )
    except (ConsoleError, *REFUSALS) as exc:
        code, detail = (exc.status, exc.detail) if isinstance(exc, ConsoleError) else refusal(exc)
        errors = _refused(detail)
        return await _form_page(request, state, viewer, account, "transfer", typed, errors, code)
    finally:
        if isinstance(upload, UploadFile):
            await upload.close()
    return RedirectResponse(
        console_path(request, f"/a/{account}?voucher={voucher.voucher_id}#recharges"),
        status_code=303,
    )
