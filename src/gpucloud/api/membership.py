"""Who may read and recharge an account: decided by Kubernetes, not by our own list.

An Account resource names the namespaces that bill to it (``spec.namespaces``). A caller
is a member of the account when the API server's RBAC lets them create Recharges in one
of those namespaces (a SubjectAccessReview for the caller's user and groups): the same
right that lets them recharge with ``kubectl apply``, so the API and kubectl never
disagree about who pays for what. A namespace two Accounts list bills to the one created
first (``gpucloud.ownership``, the operator's rule), so only that Account's members are
members through it. Admins and static demo tokens are decided by ``AuthPolicy`` before
this is asked.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import httpx
from cachetools import TTLCache

from gpucloud import ownership
from gpucloud.api.auth import AuthError, ClusterAccess, Principal
from gpucloud.kube_names import GROUP, VERSION

# The verb and resource that make a caller a member: paying into the account.
MEMBER_VERB = "create"
MEMBER_RESOURCE = "recharges"


class Membership(Protocol):
    async def is_member(self, principal: Principal, account: str) -> bool: ...

    async def aclose(self) -> None: ...


class NoMembership:
    """No cluster to ask (static tokens): only admins and tokens' own accounts."""

    async def is_member(self, principal: Principal, account: str) -> bool:
        return False

    async def aclose(self) -> None:
        return None


class ClusterMembership:
    """Reads ``Account.spec.namespaces`` and asks SubjectAccessReview for each namespace.

    Verdicts (yes and no) are cached for ``cache_ttl_s`` per user, groups and account,
    like TokenReview verdicts: a RoleBinding removed takes effect within that time.
    """

    def __init__(
        self, access: ClusterAccess, cache_ttl_s: float = 10.0, timeout_s: float = 5.0
    ) -> None:
        self.access = access
        self.cache_ttl_s = cache_ttl_s
        # asyncio only (one thread), so no lock around it
        self._cache: TTLCache[tuple[str, frozenset[str], str], bool] = TTLCache(10000, cache_ttl_s)
        self._client = access.async_client(timeout_s)

    async def is_member(self, principal: Principal, account: str) -> bool:
        key = (principal.username, principal.groups, account)
        if key in self._cache:
            return self._cache[key]
        namespaces = await self._namespaces(account)
        verdicts = await asyncio.gather(*(self._may_pay(principal, ns) for ns in namespaces))
        self._cache[key] = member = any(verdicts)
        return member

    async def _namespaces(self, account: str) -> list[str]:
        """The namespaces that bill to ``account``: those it lists, less those another
        Account claimed first. No such Account: none (nobody but admins, and no hint
        that it is missing)."""
        resp = await self._request("GET", f"/apis/{GROUP}/{VERSION}/accounts")
        if resp.status_code >= 300:
            raise AuthError(503, f"Accounts: API server answered {resp.status_code}")
        items = [a for a in resp.json().get("items") or [] if isinstance(a, dict)]
        return sorted(ownership.owned(items, account))

    async def _may_pay(self, principal: Principal, namespace: str) -> bool:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": principal.username,
                "groups": sorted(principal.groups),
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": MEMBER_VERB,
                    "group": GROUP,
                    "resource": MEMBER_RESOURCE,
                },
            },
        }
        path = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        resp = await self._request("POST", path, json=body)
        if resp.status_code >= 300:
            raise AuthError(503, f"SubjectAccessReview: API server answered {resp.status_code}")
        return bool((resp.json().get("status") or {}).get("allowed"))

    async def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        try:
            return await self._client.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise AuthError(503, f"account membership: API server unreachable ({exc})") from exc

    async def aclose(self) -> None:
        await self._client.aclose()
