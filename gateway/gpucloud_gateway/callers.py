"""Who calls a model, and whether that caller may and can pay.

A caller presents ``Authorization: Bearer <token>``. The token is checked by an
authenticator of the API's kind (``gpucloud.api.auth``: ``TokenReviewAuthenticator`` with
Kubernetes ServiceAccount tokens, its own short cache; ``StaticTokenAuthenticator`` for
tests). A ServiceAccount ``system:serviceaccount:<ns>:<name>`` calls for the Account that
lists ``<ns>`` in ``spec.namespaces`` (the same map that decides who owns a model); a
principal that carries exactly one account (static tokens) calls for that one.

* Public model: the caller's account pays each request. It must not be in arrears, must
  have a positive balance and must keep it in the currency the price book charges (no
  conversion): else ``402``.
* Private model: billed by online time to its owner; only the owner's callers (a token
  of a namespace the owning Account lists) may call it: else ``403``.
* No token, or one that does not check out: ``401``.

Resolutions (token -> account) and balances are cached for ``ttl_s`` seconds: a caller
whose balance just ran out may get a few more requests through, billed like any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpucloud.billing.model_charges import ModelPlan, Rule

SA_PREFIX = "system:serviceaccount:"
AUTH_RULE = (
    "header Authorization: Bearer <token> is required "
    "(a ServiceAccount token of a namespace an Account lists)"
)


class CallerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TokenChecker(Protocol):
    """``gpucloud.api.auth.Authenticator``: a principal (``username``, ``accounts``) or None."""

    async def authenticate(self, token: str) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass
class Directory:
    """Namespace -> account, and account -> state (``Account.status.state``) and
    currency (``spec.currency``, immutable; the ledger account is made in it), when the
    gateway reads Accounts from the cluster. Replaced as a whole when it changes."""

    owners: Mapping[str, str]
    states: Mapping[str, str]
    currencies: Mapping[str, str] = field(default_factory=dict)


def directory_from_plans(
    plans: list[ModelPlan], extra: Mapping[str, list[str]] | None = None
) -> Directory:
    """Owners' namespaces from the models, plus ``accounts: {account: [namespaces]}``."""
    owners = {p.namespace: p.account for p in plans}
    for account, namespaces in (extra or {}).items():
        for ns in namespaces:
            owners.setdefault(ns, account)
    return Directory(owners, {})


@dataclass(frozen=True)
class Funds:
    """What the ledger says an account can pay with."""

    balance_minor: int
    currency: str | None  # None: not in the ledger yet


@dataclass(frozen=True)
class Caller:
    account: str
    username: str


class Callers:
    def __init__(
        self,
        checker: TokenChecker,
        directory: Directory,
        funds: Callable[[str], Funds | None] | None = None,
        ttl_s: float = 5.0,
        currency: str | None = None,
    ) -> None:
        self.checker = checker
        self.directory = directory
        self.funds = funds  # sync (the ledger): run in a thread, cached; None: unknown
        self.ttl_s = ttl_s
        self.currency = currency  # the price book's: what public requests are charged in
        self._accounts: dict[str, tuple[float, Caller | CallerError]] = {}
        self._funds: dict[str, tuple[float, Funds | None]] = {}

    async def aclose(self) -> None:
        await self.checker.aclose()

    async def check(self, plan: ModelPlan, authorization: str | None) -> Caller:
        """The paying caller of a request to ``plan``, or CallerError(401|402|403)."""
        caller = await self.resolve(authorization)
        if plan.rule is Rule.ONLINE:
            if caller.account != plan.account:
                raise CallerError(
                    403,
                    f"model {plan.key} is private: only tokens of namespaces of account "
                    f"{plan.account!r} may call it; this token is of account {caller.account!r}",
                )
            return caller
        state = self.directory.states.get(caller.account)
        if state == "Arrears":
            raise CallerError(
                402,
                f"account {caller.account!r} is in arrears: recharge it to call public models",
            )
        funds = await self._funds_of(caller.account)
        # the ledger's word on the currency, else the Account's own (spec.currency): a
        # request served while the ledger is unreachable is still posted later, and must
        # not be posted in another currency's units
        currency = funds.currency if funds is not None else None
        currency = currency or self.directory.currencies.get(caller.account)
        if currency is not None and self.currency and currency != self.currency:
            raise CallerError(
                402,
                f"account {caller.account!r} keeps its balance in {currency} but public "
                f"models here are priced in {self.currency}: nothing is billed across "
                "currencies",
            )
        if funds is None:  # the ledger cannot say now: serve; the usage is posted later
            return caller
        if funds.balance_minor <= 0:
            raise CallerError(
                402,
                f"account {caller.account!r} has no balance ({funds.balance_minor} minor "
                "units): public models are paid by the caller; recharge it first",
            )
        return caller

    async def resolve(self, authorization: str | None) -> Caller:
        if not authorization:
            raise CallerError(401, f"missing credentials: {AUTH_RULE}")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise CallerError(401, f"malformed Authorization header: {AUTH_RULE}")
        key = hashlib.sha256(token.encode()).hexdigest()  # never keep raw tokens around
        now = time.monotonic()
        hit = self._accounts.get(key)
        if hit is not None and hit[0] > now:
            result = hit[1]
        else:
            try:
                principal = await self.checker.authenticate(token)
            except Exception as exc:  # e.g. the API server is unreachable: not cached
                raise CallerError(503, f"cannot check the caller's token now: {exc}") from None
            result = self._verdict(principal)
            if len(self._accounts) > 10000:
                self._accounts = {k: v for k, v in self._accounts.items() if v[0] > now}
            self._accounts[key] = (now + self.ttl_s, result)
        if isinstance(result, CallerError):
            raise result
        return result

    def _verdict(self, principal: Any) -> Caller | CallerError:
        if principal is None:
            return CallerError(401, f"invalid or expired token: {AUTH_RULE}")
        caller = self._caller(principal)
        if caller is None:
            return CallerError(
                403,
                f"{principal.username!r} calls for no account: a ServiceAccount of a "
                "namespace an Account lists in spec.namespaces is required",
            )
        return caller

    def _caller(self, principal: Any) -> Caller | None:
        username = principal.username
        if username.startswith(SA_PREFIX):
            ns = username.removeprefix(SA_PREFIX).split(":", 1)[0]
            account = self.directory.owners.get(ns)
            return Caller(account, username) if account else None
        accounts = getattr(principal, "accounts", frozenset())
        if len(accounts) == 1:
            return Caller(next(iter(accounts)), username)
        return None

    async def _funds_of(self, account: str) -> Funds | None:
        if self.funds is None:
            return None
        now = time.monotonic()
        hit = self._funds.get(account)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await asyncio.to_thread(self.funds, account)
        self._funds[account] = (now + self.ttl_s, value)
        return value
