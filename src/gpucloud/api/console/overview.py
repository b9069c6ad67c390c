"""What an account's console page shows, gathered from the ledger (money) and the
cluster (the operator's view: state, burn rate, instances, model deployments), and which
accounts a signed-in caller may open."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from gpucloud import ownership
from gpucloud.api.console import present
from gpucloud.api.console.session import ConsoleError, Viewer
from gpucloud.api.deps import AppState, may_access_account
from gpucloud.api.kube import ClusterUnavailable
from gpucloud.billing.money import format_money
from gpucloud.ledger import NotFound, Order, Voucher

Obj = dict[str, Any]
RECENT = 10  # recharges listed on the page
MAX_ACCOUNTS = 200  # accounts checked for a caller's home page


@dataclass(frozen=True)
class Money:
    """The ledger's side of the page (one read each, in a worker thread)."""

    currency: str
    balance_minor: int
    available_minor: int
    costs: dict[str | None, int]
    orders: list[Order]
    vouchers: list[Voucher]


def read_money(state: AppState, account: str, currency: str, now: datetime) -> Money:
    """An account the ledger does not know yet has moved no money: zero, in the currency
    its Account names (reading never creates it)."""
    try:
        acct = state.ledger.get_account(account)
    except NotFound:
        return Money(currency, 0, 0, {}, [], [])
    return Money(
        acct.currency,
        acct.balance_minor,
        state.ledger.available_balance(account, now),
        state.ledger.charges_by_resource(account, net_of_refunds=True),
        state.ledger.orders(account, newest=RECENT),
        state.ledger.vouchers(account=account)[-RECENT:],
    )


def _find(accounts: list[Obj], name: str) -> Obj | None:
    return next((a for a in accounts if a["metadata"]["name"] == name), None)


def order_status(order: Order) -> str:
    text = {"pending": "awaiting payment", "paid": "paid: credited", "expired": "expired"}
    return text.get(str(order.status), str(order.status))


def voucher_status(v: Voucher) -> str:
    if str(v.status) == "rejected":
        return f"rejected: {v.reason}" if v.reason else "rejected"
    return {"pending": "awaiting review", "approved": "approved: credited"}.get(
        str(v.status), str(v.status)
    )


def recharge_rows(money: Money, order_url: str) -> list[dict[str, str]]:
    """Recent orders and vouchers, newest first; a pending order links to its QR page
    (``order_url`` with ``{id}``)."""
    rows: list[tuple[datetime, dict[str, str]]] = []
    for o in money.orders:
        row = {
            "what": f"Online payment {o.order_id}",
            "amount": format_money(o.amount_minor, money.currency),
            "status": order_status(o),
            "at": present.when_text(o.created_at),
        }
        if str(o.status) == "pending":
            row["href"] = order_url.format(id=o.order_id)
        rows.append((o.created_at, row))
    for v in money.vouchers:
        rows.append(
            (
                v.submitted_at,
                {
                    "what": f"Bank transfer {v.transfer_no} ({v.voucher_id})",
                    "amount": format_money(v.amount_minor, money.currency),
                    "status": voucher_status(v),
                    "at": present.when_text(v.submitted_at),
                },
            )
        )
    rows.sort(key=lambda r: r[0], reverse=True)
    return [r for _, r in rows[:RECENT]]


async def overview(state: AppState, account: str, base: str) -> dict[str, Any]:
    """Everything the account page shows and its live endpoint returns."""
    now = state.settings.clock.now()
    note = ""
    acct: Obj | None = None
    instances: list[Obj] = []
    models: list[Obj] = []
    try:
        accounts = await state.settings.cluster.accounts()
        acct = _find(accounts, account)
        namespaces = sorted(ownership.owned(accounts, account)) if acct else []
        instances = await state.settings.cluster.namespaced("gpuinstances", namespaces)
        models = await state.settings.cluster.namespaced("modeldeployments", namespaces)
    except ClusterUnavailable as exc:
        note = f"The cluster could not be read ({exc}): instances and state are not shown."
    spec, status = (acct or {}).get("spec") or {}, (acct or {}).get("status") or {}
    currency = str(spec.get("currency") or state.settings.currency)
    money = await run_in_threadpool(read_money, state, account, currency, now)
    return {
        "account": account,
        "display_name": str(spec.get("displayName") or ""),
        "currency": money.currency,
        "balance": format_money(money.balance_minor, money.currency),
        "available": format_money(money.available_minor, money.currency),
        "runway": present.runway_text(money.available_minor, money.currency,
                                      status.get("costPerHour")),
        "state": present.state_text(status),
        "retention": present.retention_text(status, now),
        "instances": [present.instance_row(i, money.costs, money.currency) for i in instances],
        "models": [present.model_row(m, money.costs, money.currency) for m in models],
        "recharges": recharge_rows(money, f"{base}/a/{account}/orders/{{id}}"),
        "note": note,
        "as_of": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
    }  # fmt: skip


async def require_member(state: AppState, viewer: Viewer, account: str) -> None:
    try:
        allowed = await may_access_account(state, viewer.principal, account)
    except HTTPException as exc:
        raise ConsoleError(exc.status_code, str(exc.detail)) from None
    if not allowed:
        raise ConsoleError(
            403,
            f"{viewer.username} may not use account {account}: it may create Recharges in "
            "none of the namespaces the Account lists",
        )


def require_admin(viewer: Viewer) -> None:
    if not viewer.is_admin:
        raise ConsoleError(403, f"{viewer.username} is not an admin")


async def my_accounts(state: AppState, viewer: Viewer) -> list[tuple[str, str]]:
    """(name, display name) of the accounts the caller may open: from the cluster's
    Accounts, the static token's own, and for admins every account in the ledger."""
    names: dict[str, str] = dict.fromkeys(sorted(viewer.principal.accounts), "")
    try:
        for a in await state.settings.cluster.accounts():
            names[a["metadata"]["name"]] = str((a.get("spec") or {}).get("displayName") or "")
    except ClusterUnavailable as exc:
        raise ConsoleError(503, f"the cluster could not be read: {exc}") from None
    if viewer.is_admin:
        for acct in await run_in_threadpool(state.ledger.accounts):
            names.setdefault(acct.name, "")
    candidates = sorted(names)[:MAX_ACCOUNTS]
    try:
        verdicts = await asyncio.gather(
            *(may_access_account(state, viewer.principal, n) for n in candidates)
        )
    except HTTPException as exc:
        raise ConsoleError(exc.status_code, str(exc.detail)) from None
    return [(n, names[n]) for n, ok in zip(candidates, verdicts, strict=True) if ok]
