"""The API's reads of gpucloud's custom resources: the console's one Kubernetes edge.

The console shows what the operator wrote (an Account's state, burn rate and arrears
countdown; each GPUInstance's and ModelDeployment's state) next to the ledger's money.
Everything it reads from the cluster goes through a ``ClusterReader``:

* :class:`KubeReader`: the API server (get/list on accounts, gpuinstances and
  modeldeployments: the chart's API ClusterRole), lists cached for ``cache_ttl_s`` so a
  console polling every few seconds costs the API server one list per namespace and
  kind per interval, however many browsers watch;
* :class:`NoCluster`: static tokens (demo and unit tests): no cluster, nothing to show;
* :class:`FixedCluster`: a fixed set of objects (unit tests, demos).

Who may see which account is decided elsewhere (``membership``); this module only reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import httpx

from gpucloud.api.auth import ClusterAccess
from gpucloud.kube_names import GROUP, VERSION

Obj = dict[str, Any]
# The namespaced kinds the console lists (the chart grants get/list/watch on these).
NAMESPACED = ("gpuinstances", "modeldeployments")


class ClusterUnavailable(Exception):
    """The API server could not be asked; the message says why (no secrets in it)."""


class ClusterReader(Protocol):
    async def accounts(self) -> list[Obj]:
        """Every Account (cluster-scoped)."""
        ...

    async def namespaced(self, plural: str, namespaces: Iterable[str]) -> list[Obj]:
        """The objects of ``plural`` (one of ``NAMESPACED``) in these namespaces."""
        ...

    async def aclose(self) -> None: ...


class NoCluster:
    """No cluster configured (static tokens): no Accounts, no instances."""

    async def accounts(self) -> list[Obj]:
        return []

    async def namespaced(self, plural: str, namespaces: Iterable[str]) -> list[Obj]:
        return []

    async def aclose(self) -> None:
        return None


class FixedCluster:
    """A fixed list of objects (each with ``kind`` and ``metadata``): tests and demos."""

    def __init__(self, objects: Iterable[Obj] = ()) -> None:
        self.objects = list(objects)

    async def accounts(self) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") == "Account"]

    async def namespaced(self, plural: str, namespaces: Iterable[str]) -> list[Obj]:
        wanted = set(namespaces)
        kind = {"gpuinstances": "GPUInstance", "modeldeployments": "ModelDeployment"}[plural]
        return [
            o
            for o in self.objects
            if o.get("kind") == kind and o["metadata"].get("namespace") in wanted
        ]

    async def aclose(self) -> None:
        return None


class KubeReader:
    """Lists from the API server with the API's own identity, cached briefly."""

    def __init__(
        self, access: ClusterAccess, cache_ttl_s: float = 2.0, timeout_s: float = 5.0
    ) -> None:
        self.cache_ttl_s = cache_ttl_s
        self._client = access.async_client(timeout_s)
        # path -> (monotonic time read, items); asyncio only (one thread), so no lock
        self._cache: dict[str, tuple[float, list[Obj]]] = {}

    async def accounts(self) -> list[Obj]:
        return await self._list(f"/apis/{GROUP}/{VERSION}/accounts")

    async def namespaced(self, plural: str, namespaces: Iterable[str]) -> list[Obj]:
        if plural not in NAMESPACED:
            raise ValueError(f"plural: {plural!r} is not one of {NAMESPACED}")
        out: list[Obj] = []
        for ns in sorted(set(namespaces)):
            out += await self._list(f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{plural}")
        return out

    async def _list(self, path: str) -> list[Obj]:
        now = time.monotonic()
        hit = self._cache.get(path)
        if hit is not None and now - hit[0] < self.cache_ttl_s:
            return hit[1]
        try:
            resp = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise ClusterUnavailable(f"API server unreachable ({type(exc).__name__})") from exc
        if resp.status_code >= 300:
            raise ClusterUnavailable(f"API server answered {resp.status_code} to GET {path}")
        items = [i for i in resp.json().get("items") or [] if isinstance(i, dict)]
        if len(self._cache) > 10_000:  # namespaces come and go: forget old paths
            self._cache.clear()
        self._cache[path] = (now, items)
        return items

    async def aclose(self) -> None:
        await self._client.aclose()
