"""Pod UIDs for the pods that pod-resources names (it gives namespace and name only)."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from typing import Protocol

from gpucloud_agent.kubeapi import KubeApi

_DERIVED_NS = uuid.UUID("0b7c4b1e-2f5a-4e0b-9d8e-5a3c1f6e7d20")


class PodUidResolver(Protocol):
    def uid(self, namespace: str, name: str) -> str | None: ...


class DerivedUidResolver:
    """A stable stand-in UID (uuid5 of namespace/name) for test beds without API access.

    Two pods that reuse one name share it; production uses KubeUidResolver."""

    def uid(self, namespace: str, name: str) -> str | None:
        return _derived_uid(namespace, name)


@functools.lru_cache(maxsize=4096)  # asked for every held GPU every second; uuid5 is a SHA-1
def _derived_uid(namespace: str, name: str) -> str:
    return str(uuid.uuid5(_DERIVED_NS, f"{namespace}/{name}"))


class KubeUidResolver:
    """Looks UIDs up among the pods on this node (listed on a miss, at most every 2 s)."""

    def __init__(
        self,
        node: str,
        kubeconfig: str | None = None,
        min_refresh_s: float = 2.0,
        api: KubeApi | None = None,
    ) -> None:
        self._api = api or KubeApi.from_flags(kubeconfig)
        self.node = node
        self.min_refresh_s = min_refresh_s
        self._uids: dict[tuple[str, str], str] = {}
        self._refreshed = -1e9
        self._lock = threading.Lock()

    def uid(self, namespace: str, name: str) -> str | None:
        with self._lock:
            key = (namespace, name)
            if key not in self._uids and time.monotonic() - self._refreshed >= self.min_refresh_s:
                pods = self._api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node}")
                self._uids = {
                    (m["namespace"], m["name"]): m["uid"]
                    for m in (p["metadata"] for p in pods["items"])
                }
                self._refreshed = time.monotonic()
            return self._uids.get(key)
