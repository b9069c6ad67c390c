"""Recharge: online payment orders (QR code + signed callback) and bank-transfer vouchers."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from gpucloud.api import recharges
from gpucloud.api.deps import Account, Admin, Caller, State, may_access_account
from gpucloud.api.guard import StrictRoute
from gpucloud.api.schemas import (
    BankTransferIn,
    CallbackOut,
    OnlineRechargeIn,
    OrderOut,
    Problem,
    ReviewIn,
    VoucherOut,
    VouchersOut,
)
from gpucloud.billing.money import format_money
from gpucloud.ledger import NotFound, Order, OrderStatus, Voucher
from gpucloud.recharge import CallbackError, PaymentNotice, SignatureError
from gpucloud.recharge.qr import qr_png

router = APIRouter(route_class=StrictRoute, tags=["recharge"])

_AUTH = {401: {"model": Problem}, 403: {"model": Problem}}
OrderId = Annotated[str, Path(min_length=1, max_length=64)]
ProviderName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
VoucherId = Annotated[str, Path(min_length=1, max_length=64)]


def _order_out(state: State, request: Request, order: Order) -> OrderOut:
    currency = state.ledger.get_account(order.account).currency
    qr = request.url_for("get_order_qr", account=order.account, order_id=order.order_id)
    return OrderOut(
        order_id=order.order_id,
        client_order_id=order.client_ref,
        account=order.account,
        amount_minor=order.amount_minor,
        amount=format_money(order.amount_minor, currency),
        provider=order.provider,
        status=str(order.status),
        created_at=order.created_at,
        expires_at=order.expires_at,
        paid_at=order.paid_at,
        payment_url=recharges.payment_url(state, order, currency),
        qr_png_url=str(qr),
    )


@router.post(
    "/v1/accounts/{account}/recharges/online",
    status_code=201,
    response_model=OrderOut,
    responses={**_AUTH, 404: {"model": Problem}},
)
def create_online_recharge(
    account: Account, body: OnlineRechargeIn, caller: Caller, state: State, request: Request
) -> OrderOut:
    """A payment order: open ``payment_url`` or scan the QR code at ``qr_png_url``."""
    order = recharges.open_order(
        state, account, body.amount, body.amount_minor, body.provider, caller, body.client_order_id
    )
    return _order_out(state, request, order)


@router.get(
    "/v1/accounts/{account}/orders/{order_id}",
    response_model=OrderOut,
    responses={**_AUTH, 404: {"model": Problem}},
)
def get_order(account: Account, order_id: OrderId, state: State, request: Request) -> OrderOut:
    return _order_out(state, request, recharges.account_order(state, account, order_id))


@router.get(
    "/v1/accounts/{account}/orders/{order_id}/qr.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_AUTH, 404: {"model": Problem}},
)
def get_order_qr(account: Account, order_id: OrderId, state: State) -> Response:
    order = recharges.account_order(state, account, order_id)
    url = recharges.payment_url(state, order, state.ledger.get_account(account).currency)
    return Response(qr_png(url), media_type="image/png")


@router.post(
    "/v1/payments/{provider}/callback",
    response_model=CallbackOut,
    responses={
        401: {"model": Problem, "description": "signature missing, stale or wrong"},
        404: {"model": Problem},
        409: {"model": Problem, "description": "order expired, amount mismatch, ..."},
        422: {"model": Problem},
    },
)
async def payment_callback(provider: ProviderName, request: Request, state: State) -> CallbackOut:
    """Called by the payment provider; authenticated by its HMAC signature, not a token."""
    impl = state.settings.providers.get(provider)
    if impl is None:
        raise HTTPException(404, f"provider {provider!r} is not configured")
    now = state.settings.clock.now()
    try:
        impl.check_headers(request.headers, now)  # before a byte of the body is read
    except SignatureError as exc:
        raise HTTPException(401, str(exc)) from None
    body = await request.body()  # at most the RequestGuard's limit
    try:
        notice = impl.verify_callback(request.headers, body, now)
    except SignatureError as exc:
        raise HTTPException(401, str(exc)) from None
    except CallbackError as exc:
        raise HTTPException(422, str(exc)) from None
    return await run_in_threadpool(_settle, state, provider, notice, now)


def _settle(state: State, provider: str, notice: PaymentNotice, now: datetime) -> CallbackOut:
    before = state.ledger.get_order(notice.order_id)
    if before.provider != provider:
        raise HTTPException(
            409, f"order {notice.order_id!r} belongs to provider {before.provider!r}"
        )
    currency = state.ledger.get_account(before.account).currency
    if notice.currency != currency:
        raise HTTPException(
            422, f"currency: {notice.currency!r} does not match the account's {currency!r}"
        )
    if notice.status != "paid":
        return CallbackOut(order_id=before.order_id, status=str(before.status), credited=False)
    after = state.ledger.settle_order(
        notice.order_id, notice.provider_txn_id, notice.amount_minor, now
    )
    credited = before.status is OrderStatus.PENDING and after.status is OrderStatus.PAID
    return CallbackOut(order_id=after.order_id, status=str(after.status), credited=credited)


def _voucher_out(state: State, v: Voucher) -> VoucherOut:
    currency = state.ledger.get_account(v.account).currency
    return VoucherOut(
        voucher_id=v.voucher_id,
        account=v.account,
        amount_minor=v.amount_minor,
        amount=format_money(v.amount_minor, currency),
        payer=v.payer,
        bank=v.bank,
        transfer_no=v.transfer_no,
        file_sha256=v.file_sha256,
        status=str(v.status),
        submitted_at=v.submitted_at,
        submitter=v.submitter,
        reviewer=v.reviewer,
        reason=v.reason,
        reviewed_at=v.reviewed_at,
    )


@router.post(
    "/v1/accounts/{account}/recharges/bank-transfer",
    status_code=201,
    response_model=VoucherOut,
    responses={**_AUTH, 409: {"model": Problem}, 413: {"model": Problem}},
)
def submit_bank_transfer(
    account: Account, body: BankTransferIn, caller: Caller, state: State
) -> VoucherOut:
    """A bank-transfer voucher, pending an admin's review. The voucher file is required
    (the seed has the payer upload it). Only its SHA-256 goes into the ledger; the file
    itself is kept under the configured voucher directory, where the reviewing admin
    reads it (``GET /v1/vouchers/{id}/file``)."""
    try:
        content = base64.b64decode(body.file.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "file.content_base64: not valid base64") from None
    voucher = recharges.keep_voucher(
        state, account, body.amount, body.amount_minor, body.payer, body.bank,
        body.transfer_no, content, caller,
    )  # fmt: skip
    return _voucher_out(state, voucher)


@router.get("/v1/vouchers", response_model=VouchersOut, responses=_AUTH)
def list_vouchers(
    _: Admin,
    state: State,
    status: Annotated[str | None, Query(pattern=r"^(pending|approved|rejected)$")] = None,
    account: Annotated[str | None, Query(min_length=1, max_length=253)] = None,
) -> VouchersOut:
    """Admins: vouchers to review (``status=pending``)."""
    vouchers = state.ledger.vouchers(status=status, account=account)
    return VouchersOut(vouchers=[_voucher_out(state, v) for v in vouchers])


@router.get(
    "/v1/vouchers/{voucher_id}",
    response_model=VoucherOut,
    responses={**_AUTH, 404: {"model": Problem}},
)
async def get_voucher(voucher_id: VoucherId, caller: Caller, state: State) -> VoucherOut:
    voucher = await run_in_threadpool(state.ledger.get_voucher, voucher_id)
    if not await may_access_account(state, caller, voucher.account):
        raise NotFound(f"voucher {voucher_id!r} not found")
    return _voucher_out(state, voucher)


@router.get(
    "/v1/vouchers/{voucher_id}/file",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        **_AUTH,
        404: {"model": Problem},
    },
)
def get_voucher_file(voucher_id: VoucherId, _: Admin, state: State) -> Response:
    """Admins: the uploaded voucher file, to check before approving. Its SHA-256 is the
    one recorded in the ledger (checked again here)."""
    content = recharges.voucher_file(state, voucher_id)
    return Response(content, media_type="application/octet-stream")


@router.post(
    "/v1/vouchers/{voucher_id}/review",
    response_model=VoucherOut,
    responses={**_AUTH, 404: {"model": Problem}, 409: {"model": Problem}},
)
def review_voucher(voucher_id: VoucherId, body: ReviewIn, admin: Admin, state: State) -> VoucherOut:
    """Admins: approve (credits exactly once) or reject (a reason is required). 409 for
    a voucher already reviewed, one the caller submitted (``own_voucher``), or a transfer
    already credited to an account (``transfer_credited``)."""
    voucher = recharges.review(state, voucher_id, body.decision == "approve", admin, body.reason)
    return _voucher_out(state, voucher)
