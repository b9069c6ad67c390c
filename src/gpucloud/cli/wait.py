"""``gpucloud wait KIND NAME --for PHASE``: poll the Kubernetes API server (as ``kubectl
wait`` does, with the kubeconfig's credentials) until an object reaches a phase or a
condition, showing progress on stderr.

The decisions (which field, which phases are final, how long) are pure functions here;
the loop takes its fetch, clock and sleep as arguments so tests drive it without a cluster.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from gpucloud.kube_names import GROUP, VERSION


@dataclass(frozen=True)
class Kind:
    plural: str
    field: str  # the status field --for PHASE reads
    final: frozenset[str]  # phases that never change again: waiting longer is pointless


_GI = Kind("gpuinstances", "phase", frozenset({"Refused", "Released"}))
_MD = Kind("modeldeployments", "state", frozenset())
_RCH = Kind("recharges", "phase", frozenset({"Credited", "Rejected", "Expired", "Failed"}))
_STORE = Kind("clouddisks", "phase", frozenset({"Failed", "Deleted"}))
_IMG = Kind("images", "phase", frozenset({"Failed", "Deleted"}))
KINDS: dict[str, Kind] = {
    **dict.fromkeys(["gi", "gpui", "gpuinstance", "gpuinstances"], _GI),
    **dict.fromkeys(["md", "modeldeployment", "modeldeployments"], _MD),
    **dict.fromkeys(["rch", "recharge", "recharges"], _RCH),
    **dict.fromkeys(["cdisk", "cd", "clouddisk", "clouddisks"], _STORE),
    **dict.fromkeys(["img", "image", "images"], _IMG),
}


class WaitError(Exception):
    """A wait that cannot go on; ``code`` is the exit code's name (see exitcodes)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """``5m``, ``1h30m``, ``90s`` or plain seconds (``90``) -> seconds."""
    if text.isdigit():
        return float(text)
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"--timeout: {text!r} is not a duration such as 90s, 5m or 1h30m")
    h, mi, s = (int(g or 0) for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


@dataclass(frozen=True)
class Want:
    """``Running`` (the kind's phase field) or ``condition=Ready`` (a condition True)."""

    phase: str | None = None
    condition: str | None = None

    @classmethod
    def parse(cls, text: str) -> Want:
        key, sep, value = text.partition("=")
        if sep and key == "condition" and value:
            return cls(condition=value)
        if not sep and text:
            return cls(phase=text)
        raise ValueError(f"--for: {text!r} is neither a phase (Running) nor condition=TYPE")

    def describe(self) -> str:
        return f"condition {self.condition}" if self.condition else f"{self.phase}"


def observe(obj: dict[str, Any], kind: Kind) -> str:
    """The word progress shows: the phase (or state), '(no status yet)' before the first."""
    return str((obj.get("status") or {}).get(kind.field) or "(no status yet)")


def verdict(obj: dict[str, Any], kind: Kind, want: Want) -> bool | None:
    """True: reached. False: a final phase other than the wanted one. None: keep waiting."""
    status = obj.get("status") or {}
    if want.condition:
        conds = status.get("conditions") or []
        if any(c.get("type") == want.condition and c.get("status") == "True" for c in conds):
            return True
    elif status.get(kind.field) == want.phase:
        return True
    return False if status.get(kind.field) in kind.final else None


def wait_for(
    fetch: Callable[[], dict[str, Any] | None],
    kind: Kind,
    want: Want,
    timeout_s: float,
    progress: Callable[[str, float], None],
    interval_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until ``want``; progress(observed, elapsed_s) after every poll."""
    start = clock()
    while True:
        obj = fetch()
        elapsed = clock() - start
        if obj is None:
            progress("(not found)", elapsed)
        else:
            progress(observe(obj, kind), elapsed)
            done = verdict(obj, kind, want)
            if done:
                return obj
            if done is False:
                raise WaitError(
                    "FAILED", f"{observe(obj, kind)} is final: it will never be {want.describe()}"
                )
        if elapsed >= timeout_s:
            seen = "it does not exist" if obj is None else f"still {observe(obj, kind)}"
            raise WaitError(
                "NOT_FOUND" if obj is None else "TIMEOUT",
                f"timed out after {timeout_s:g}s waiting for {want.describe()}: {seen}",
            )
        sleep(min(interval_s, max(0.0, timeout_s - elapsed)))


class KubeReader:
    """GET one gpucloud object from the Kubernetes API server (nothing else)."""

    def __init__(
        self,
        server: str,
        token: str | None,
        verify: bool | str,
        cert: tuple[str, str] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server, headers=headers, verify=verify, cert=cert, timeout=30
        )

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}"
        try:
            resp = self._http.get(path)
        except httpx.HTTPError as exc:
            msg = f"cannot reach the API server {self.server}: {exc}"
            raise WaitError("UNREACHABLE", msg) from None
        if resp.status_code == 404:
            return None
        if resp.status_code in (401, 403):
            raise WaitError("AUTH", f"API server: HTTP {resp.status_code} reading {plural}/{name}")
        if resp.status_code >= 400:
            code = "SERVER" if resp.status_code >= 500 else "ERROR"
            raise WaitError(code, f"API server: HTTP {resp.status_code}: {resp.text[:300]}")
        body: dict[str, Any] = resp.json()
        return body
