"""Account queries: balance, statement, usage, charges per resource, meters, audit
trail, monthly statements (JSON, CSV, PDF)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from gpucloud.api.deps import Account, State
from gpucloud.api.guard import StrictRoute
from gpucloud.api.schemas import (
    AuditEventOut,
    AuditOut,
    BalanceOut,
    ChargeOut,
    ChargesOut,
    EntryOut,
    MeterOut,
    MetersOut,
    Problem,
    StatementOut,
    UsageOut,
    UsageRowOut,
)
from gpucloud.billing.money import format_money
from gpucloud.billing.statement import Period, Statement
from gpucloud.statements import collect, to_csv, to_dict, to_pdf

router = APIRouter(
    route_class=StrictRoute,
    prefix="/v1/accounts/{account}",
    tags=["accounts"],
    responses={401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem}},
)


@router.get("/balance", response_model=BalanceOut)
def get_balance(account: Account, state: State) -> BalanceOut:
    acct = state.ledger.get_account(account)
    available = state.ledger.available_balance(account, state.settings.clock.now())
    return BalanceOut(
        account=account,
        currency=acct.currency,
        balance_minor=acct.balance_minor,
        available_minor=available,
        balance=format_money(acct.balance_minor, acct.currency),
        available=format_money(available, acct.currency),
    )


@router.get("/entries", response_model=StatementOut)
def get_entries(
    account: Account,
    state: State,
    after_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    resource: Annotated[str | None, Query(min_length=1, max_length=253)] = None,
) -> StatementOut:
    """The statement, oldest first, each entry with the running balance after it."""
    acct = state.ledger.get_account(account)
    entries = state.ledger.entries(account, resource=resource, after_id=after_id, limit=limit)
    return StatementOut(
        account=account,
        currency=acct.currency,
        entries=[
            EntryOut(
                id=e.id,
                kind=str(e.kind),
                amount_minor=e.amount_minor,
                balance_after_minor=e.balance_after,
                key=e.key,
                resource=e.resource,
                memo=e.memo,
                at=e.at,
            )
            for e in entries
        ],
        next_after_id=entries[-1].id if len(entries) == limit else None,
    )


@router.get("/usage", response_model=UsageOut)
def get_usage(
    account: Account,
    state: State,
    since: datetime | None = None,
    until: datetime | None = None,
    kind: Annotated[
        str | None, Query(pattern=r"^(gpu_time|instance_volume|cloud_disk|image)$")
    ] = None,
) -> UsageOut:
    """GPU-seconds and byte-seconds per resource, of usage rated to this account."""
    state.ledger.get_account(account)
    rows = state.ledger.usage_summary(account=account, kind=kind, since=since, until=until)
    return UsageOut(
        account=account,
        rows=[
            UsageRowOut(
                resource=r.resource,
                kind=r.kind,
                gpu_seconds=r.gpu_seconds,
                byte_seconds=r.byte_seconds,
                records=r.records,
            )
            for r in rows
        ],
    )


@router.get("/charges", response_model=ChargesOut)
def get_charges(account: Account, state: State) -> ChargesOut:
    acct = state.ledger.get_account(account)
    charges = state.ledger.charges_by_resource(account)
    return ChargesOut(
        account=account,
        currency=acct.currency,
        charges=[
            ChargeOut(resource=res, amount_minor=amt, amount=format_money(amt, acct.currency))
            for res, amt in sorted(charges.items(), key=lambda kv: kv[0] or "")
        ],
    )


@router.get("/meters", response_model=MetersOut)
def get_meters(
    account: Account,
    state: State,
    which: Annotated[str, Query(alias="state", pattern=r"^(open|late)$")],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MetersOut:
    """``state=open``: the meters running now. ``state=late``: settled meters that got
    agent usage after their settlement (stored, never charged), for an admin to look
    into: an agent that was down past the grace period, or a clock out of step. The
    ``limit`` most recently opened, newest first."""
    acct = state.ledger.get_account(account)
    meters = state.ledger.meters(
        account, open_only=which == "open", late_only=which == "late", newest=limit
    )
    return MetersOut(
        account=account,
        currency=acct.currency,
        meters=[MeterOut.model_validate(m) for m in meters],
    )


@router.get("/audit", response_model=AuditOut)
def get_audit(
    account: Account, state: State, limit: Annotated[int, Query(ge=1, le=10000)] = 1000
) -> AuditOut:
    """Who did what when: orders created and paid, vouchers submitted and reviewed."""
    state.ledger.get_account(account)
    events = state.ledger.audit_events(account, limit=limit)
    return AuditOut(
        account=account,
        events=[
            AuditEventOut(
                id=e.id,
                account=e.account,
                at=e.at,
                actor=e.actor,
                action=e.action,
                subject=e.subject,
                detail=e.detail,
            )
            for e in events
        ],
    )


_MEDIA = {"csv": "text/csv; charset=utf-8", "pdf": "application/pdf"}


@router.get(
    "/statement",
    responses={
        200: {"content": {"application/json": {}, _MEDIA["csv"]: {}, _MEDIA["pdf"]: {}}},
        422: {"model": Problem},
    },
)
def get_statement(
    account: Account,
    state: State,
    period: Annotated[str, Query(description="a calendar month in UTC: YYYY-MM")],
    format: Annotated[str, Query(pattern=r"^(json|csv|pdf)$")] = "json",
) -> Response:
    """The month's statement: opening balance, payments, refunds, adjustments, charges
    by resource (GPU-seconds, rates), closing balance."""
    return statement_response(collect(state.ledger, account, Period.parse(period)), format)


def statement_response(st: Statement, format: str) -> Response:
    """The statement as JSON, or as a CSV or PDF download (the console's too)."""
    if format == "json":
        return Response(json.dumps(to_dict(st)), media_type="application/json")
    name = f"statement-{st.account}-{st.period}.{format}"
    body: bytes = to_csv(st).encode() if format == "csv" else to_pdf(st)
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(body, media_type=_MEDIA[format], headers=headers)
