"""FastAPI dependencies: the app's state, the caller, and the authorization checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from gpucloud.api.auth import AuthError, Principal
from gpucloud.api.gate import FairLock, GroupCommit
from gpucloud.api.metrics import ApiMetrics
from gpucloud.api.rating import RatingLoop
from gpucloud.api.settings import Settings
from gpucloud.ledger import Ledger
from gpucloud.ledger.types import IngestResult
from gpucloud.ledger.wire import WireBatch
from gpucloud.usage import UsageRecord

AccountName = Annotated[
    str, Path(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


@dataclass
class AppState:
    settings: Settings
    ledger: Ledger
    metrics: ApiMetrics
    rating: RatingLoop
    write_gate: FairLock
    # POST /v1/usage's batches, written in groups behind write_gate (routes_usage)
    ingest_group: GroupCommit[WireBatch | list[UsageRecord], IngestResult]


def get_state(request: Request) -> AppState:
    return request.app.state.gpucloud


State = Annotated[AppState, Depends(get_state)]


async def get_principal(request: Request, state: State) -> Principal:
    checked = getattr(request.state, "principal", None)  # by the RequestGuard, before the body
    if checked is not None:
        return checked  # type: ignore[no-any-return]
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "Authorization: a Bearer token is required", {"WWW-Authenticate": "Bearer"}
        )
    try:
        principal = await state.settings.authenticator.authenticate(token.strip())
    except AuthError as exc:
        raise HTTPException(exc.status, exc.detail) from None
    if principal is None:
        raise HTTPException(
            401, "Authorization: the token is not valid", {"WWW-Authenticate": "Bearer"}
        )
    return principal


Caller = Annotated[Principal, Depends(get_principal)]


def require_admin(caller: Caller, state: State) -> Principal:
    if not state.settings.policy.is_admin(caller):
        raise HTTPException(403, f"{caller.username!r} is not an admin")
    return caller


Admin = Annotated[Principal, Depends(require_admin)]


async def may_access_account(state: AppState, caller: Principal, account: str) -> bool:
    if state.settings.policy.can_access_account(caller, account):
        return True
    try:
        return await state.settings.membership.is_member(caller, account)
    except AuthError as exc:
        raise HTTPException(exc.status, exc.detail) from None


async def require_account(account: AccountName, caller: Caller, state: State) -> str:
    if not await may_access_account(state, caller, account):
        raise HTTPException(
            403,
            f"{caller.username!r} may not access account {account!r}: it may create "
            "Recharges in none of the namespaces the Account lists",
        )
    return account


Account = Annotated[str, Depends(require_account)]


def agent_node(caller: Principal, state: AppState) -> str:
    """The node whose agent ``caller`` is (401/403 from the policy otherwise)."""
    try:
        return state.settings.policy.agent_node(caller)
    except AuthError as exc:
        raise HTTPException(exc.status, exc.detail) from None
