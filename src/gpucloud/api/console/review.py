"""Admins: the bank-transfer review queue, each voucher's file beside its amount and
payer, and the decision. An admin approves only what they saw: the review form carries
the SHA-256 of the file shown and the amount shown, and both are checked again here
(the file) and in the ledger's transaction (the amount, ``expect_amount``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from gpucloud.api import recharges
from gpucloud.api.console import session as s
from gpucloud.api.console.overview import require_admin, voucher_status
from gpucloud.api.console.present import when_text
from gpucloud.api.console.session import Console, ConsoleError, console_path
from gpucloud.api.console.web import page
from gpucloud.api.deps import AppState, State
from gpucloud.api.errors import REFUSALS, refusal
from gpucloud.billing.money import format_money
from gpucloud.ledger import NotFound, Voucher

router = APIRouter(prefix="/console/admin", include_in_schema=False)
VoucherId = Annotated[str, Path(min_length=1, max_length=64)]
STATUSES = ("pending", "approved", "rejected", "all")

# What a voucher file is, by its first bytes (never by its name or the uploader's type):
# shown inline only as one of these; anything else is offered as a download.
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
]


def file_type(content: bytes) -> str:
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in _MAGIC if content.startswith(magic)), "application/octet-stream")


def _row(state: AppState, v: Voucher) -> dict[str, str]:
    currency = state.ledger.get_account(v.account).currency
    return {
        "id": v.voucher_id,
        "account": v.account,
        "amount": format_money(v.amount_minor, currency),
        "amount_minor": str(v.amount_minor),
        "payer": v.payer,
        "bank": v.bank,
        "transfer_no": v.transfer_no,
        "status": voucher_status(v),
        "pending": "yes" if str(v.status) == "pending" else "",
        "submitted": when_text(v.submitted_at),
        "submitter": v.submitter or "",
        "reviewer": v.reviewer or "",
        "sha256": v.file_sha256 or "",
    }


def _queue(state: AppState, status: str, reviewed: str) -> dict[str, Any]:
    vouchers = state.ledger.vouchers(status=None if status == "all" else status)
    notice = ""
    if reviewed:
        try:
            done = state.ledger.get_voucher(reviewed)
            notice = f"Voucher {done.voucher_id}: {voucher_status(done)}."
        except NotFound:
            pass
    return {"rows": [_row(state, v) for v in vouchers], "notice": notice}


@router.get("/vouchers")
async def queue(
    request: Request,
    viewer: Console,
    state: State,
    status: Annotated[str, Query(pattern=r"^(pending|approved|rejected|all)$")] = "pending",
    reviewed: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    require_admin(viewer)
    data = await run_in_threadpool(_queue, state, status, reviewed)
    context = {"title": "Bank transfers to review", "status": status, "statuses": STATUSES, **data}
    return page(request, "queue.html", context, viewer=viewer)


def _voucher_view(state: AppState, voucher_id: str) -> dict[str, Any]:
    v = state.ledger.get_voucher(voucher_id)
    try:
        kind = file_type(recharges.voucher_file(state, voucher_id))
    except NotFound:
        kind = ""  # no file kept by this API: nothing to see, so nothing to approve
    return {**_row(state, v), "file_type": kind, "own": ""}


async def voucher_page(
    request: Request, state: AppState, viewer: s.Viewer, voucher_id: str,
    error: str = "", status: int = 200,
) -> Response:  # fmt: skip
    try:
        v = await run_in_threadpool(_voucher_view, state, voucher_id)
    except REFUSALS as exc:
        raise ConsoleError(*refusal(exc)) from None
    v["own"] = "yes" if v["submitter"] == viewer.username else ""
    context = {"title": f"Voucher {voucher_id}", "v": v, "error": error,
               "file_url": console_path(request, f"/admin/vouchers/{voucher_id}/file")}  # fmt: skip
    return page(request, "voucher.html", context, viewer=viewer, status=status)


@router.get("/vouchers/{voucher_id}")
async def show_voucher(
    request: Request, voucher_id: VoucherId, viewer: Console, state: State
) -> Response:
    require_admin(viewer)
    return await voucher_page(request, state, viewer, voucher_id)


@router.get("/vouchers/{voucher_id}/file")
async def voucher_file(voucher_id: VoucherId, viewer: Console, state: State) -> Response:
    require_admin(viewer)
    try:
        content = await run_in_threadpool(recharges.voucher_file, state, voucher_id)
    except REFUSALS as exc:
        raise ConsoleError(*refusal(exc)) from None
    kind = file_type(content)
    disposition = "inline" if kind != "application/octet-stream" else "attachment"
    headers = {"Content-Disposition": f'{disposition}; filename="voucher-{voucher_id}"'}
    return Response(content, media_type=kind, headers=headers)


def _decide(state: AppState, viewer: s.Viewer, voucher_id: str, form: dict[str, str]) -> Voucher:
    decision = form.get("decision", "")
    if decision not in ("approve", "reject"):
        raise ConsoleError(422, "decision: choose approve or reject")
    shown = state.ledger.get_voucher(voucher_id)
    if not shown.file_sha256 or not s.same(form.get("file_sha256"), shown.file_sha256):
        raise ConsoleError(
            409, "file_sha256: this is not the voucher file you were shown; reload the voucher"
        )
    if len(form.get("reason", "")) > 1000:
        raise ConsoleError(422, "reason: at most 1000 characters")
    amount = form.get("amount_minor", "")
    if not amount.isascii() or not amount.isdigit() or len(amount) > 15:
        raise ConsoleError(422, "amount_minor: the amount you were shown is missing; reload")
    return recharges.review(
        state, voucher_id, decision == "approve", viewer.principal, form.get("reason", ""),
        expect_amount=int(amount),
    )  # fmt: skip


@router.post("/vouchers/{voucher_id}/review")
async def review(
    request: Request, voucher_id: VoucherId, viewer: Console, state: State
) -> Response:
    require_admin(viewer)
    form = await request.form(max_files=0, max_fields=10)
    s.check_csrf(viewer, form.get("csrf"))
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        await run_in_threadpool(_decide, state, viewer, voucher_id, fields)
    except ConsoleError as exc:
        return await voucher_page(request, state, viewer, voucher_id, exc.detail, exc.status)
    except REFUSALS as exc:
        code, detail = refusal(exc)
        return await voucher_page(request, state, viewer, voucher_id, detail, code)
    return RedirectResponse(
        console_path(request, f"/admin/vouchers?reviewed={voucher_id}"), status_code=303
    )
