"""Who is calling: bearer tokens turned into principals, behind a small protocol.

Two authenticators:
* :class:`TokenReviewAuthenticator` (production): Kubernetes ServiceAccount tokens
  checked with an ``authentication.k8s.io/v1`` TokenReview against the API server,
  results cached briefly.
* :class:`StaticTokenAuthenticator` (demo and unit tests ONLY): a fixed token table.

Authorization rules (:class:`AuthPolicy`) are separate from authentication so the
same rules apply whichever authenticator is plugged in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import yaml
from cachetools import TTLCache

from gpucloud.clock import monotonic

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
DEFAULT_AGENT_SA = "system:serviceaccount:gpucloud-system:gpucloud-agent"
SA_PREFIX = "system:serviceaccount:"
IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# how long a token read from a file is used before the file is read again
TOKEN_REREAD_S = 60.0


@dataclass(frozen=True)
class Principal:
    username: str
    groups: frozenset[str] = frozenset()
    node: str | None = None  # from the token's bound node claim, if any
    accounts: frozenset[str] = frozenset()  # accounts a tenant may read and recharge

    @property
    def service_account_namespace(self) -> str | None:
        if self.username.startswith(SA_PREFIX):
            return self.username.removeprefix(SA_PREFIX).split(":", 1)[0]
        return None


class AuthError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal | None:
        """The principal the token belongs to, or None when the token is not valid."""
        ...

    async def aclose(self) -> None: ...


class StaticTokenAuthenticator:
    """FOR THE DEMO AND UNIT TESTS ONLY: a fixed table of bearer tokens."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._tokens = dict(tokens)

    async def authenticate(self, token: str) -> Principal | None:
        return self._tokens.get(token)

    async def aclose(self) -> None:
        return None


class FileToken(httpx.Auth):
    """A bearer token kept in a file that something else rotates: a projected
    ServiceAccount token, which the kubelet replaces about hourly and which then expires.

    The file is read when this is made (a missing file fails at start), again when the
    token in hand is ``reread_s`` old, and at once when the API server answers 401; the
    request is then sent once more, only if the file held a different token (the same
    one would be refused again)."""

    requires_request_body = True  # a retried POST sends its body again

    def __init__(
        self,
        path: str | os.PathLike[str],
        reread_s: float = TOKEN_REREAD_S,
        monotonic: Callable[[], float] = monotonic,
    ) -> None:
        self.path = Path(path)
        self.reread_s = reread_s
        self._monotonic = monotonic
        self._token = self.path.read_text().strip()
        self._read_at = monotonic()

    def token(self, force: bool = False) -> str:
        now = self._monotonic()
        if force or now - self._read_at >= self.reread_s:
            # gone for a moment (an unmounted volume): keep the last token, try next time
            with contextlib.suppress(OSError):
                self._token = self.path.read_text().strip()
            self._read_at = now
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self.token()
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if response.status_code == 401:
            fresh = self.token(force=True)
            if fresh != sent:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request


@dataclass
class ClusterAccess:
    """Enough of a kubeconfig to POST to the API server."""

    server: str
    verify: ssl.SSLContext | bool = True
    bearer_token: str | None = None  # a literal token: never changes
    client_cert: tuple[str, str] | None = None
    # a token from a file (in-cluster, kubeconfig tokenFile): re-read as it is rotated;
    # one for every client of this access, so they read the file once between them
    token_file: FileToken | None = None
    _tmpfiles: list[str] = field(default_factory=list)

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None):
        cfg = yaml.safe_load(Path(path).read_text())
        base = Path(path).parent
        ctx_name = context or cfg.get("current-context")
        ctx = _named(cfg.get("contexts", []), ctx_name, "context")
        cluster = _named(cfg.get("clusters", []), ctx["cluster"], "cluster")
        user = _named(cfg.get("users", []), ctx.get("user"), "user") if ctx.get("user") else {}
        access = cls(server=cluster["server"].rstrip("/"))
        ctx = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif ca := access._material(cluster, "certificate-authority", base):
            ctx.load_verify_locations(cafile=ca)
        access.bearer_token = user.get("token")
        if user.get("tokenFile"):
            # as client-go reads it: the file, read again and again, wins over ``token``;
            # relative to the kubeconfig's folder (as kubectl and gpucloud.cli resolve it)
            access.token_file = FileToken(_beside(base, Path(user["tokenFile"]).expanduser()))
            access.bearer_token = None
        cert = access._material(user, "client-certificate", base)
        key = access._material(user, "client-key", base)
        if cert and key:
            access.client_cert = (cert, key)
            ctx.load_cert_chain(cert, key)
        access.verify = ctx
        return access

    @classmethod
    def in_cluster(cls) -> ClusterAccess:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            verify=ssl.create_default_context(cafile=str(IN_CLUSTER_DIR / "ca.crt")),
            token_file=FileToken(IN_CLUSTER_DIR / "token"),
        )

    def async_client(self, timeout_s: float) -> httpx.AsyncClient:
        """A client for this API server, authenticated as configured (bearer token, read
        again as its file is rotated; a client certificate is in ``verify``'s SSL context)."""
        headers = {"Authorization": f"Bearer {self.bearer_token}"} if self.bearer_token else {}
        return httpx.AsyncClient(
            base_url=self.server,
            verify=self.verify,
            timeout=timeout_s,
            headers=headers,
            auth=self.token_file,
        )

    def _material(self, section: dict[str, Any], key: str, base: Path) -> str | None:
        """A file path for ``key`` or ``key-data`` (base64 inline data is spilled to a file)."""
        if section.get(f"{key}-data"):
            fd, name = tempfile.mkstemp(prefix="gpucloud-kube-", suffix=".pem")
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64decode(section[f"{key}-data"]))
            self._tmpfiles.append(name)
            return name
        if section.get(key):
            return str(_beside(base, Path(section[key])))
        return None


def _beside(base: Path, path: Path) -> Path:
    """A kubeconfig's file name: relative ones are relative to the kubeconfig's folder."""
    return path if path.is_absolute() else base / path


def _named(items: list[dict[str, Any]], name: str | None, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item[what]
    raise ValueError(f"kubeconfig: no {what} named {name!r}")


class TokenReviewAuthenticator:
    """Checks tokens with TokenReview; caches verdicts (valid and invalid) for ``cache_ttl_s``."""

    def __init__(
        self,
        access: ClusterAccess,
        audiences: list[str] | None = None,
        cache_ttl_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.access = access
        self.audiences = audiences or []
        self.cache_ttl_s = cache_ttl_s
        # verdicts by token hash; asyncio only (one thread), so no lock around it
        self._cache: TTLCache[str, Principal | None] = TTLCache(10000, cache_ttl_s)
        self._client = access.async_client(timeout_s)

    async def authenticate(self, token: str) -> Principal | None:
        key = hashlib.sha256(token.encode()).hexdigest()  # never keep raw tokens around
        if key in self._cache:
            return self._cache[key]
        principal = await self._review(token)
        self._cache[key] = principal
        return principal

    async def _review(self, token: str) -> Principal | None:
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = self.audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            resp = await self._client.post("/apis/authentication.k8s.io/v1/tokenreviews", json=body)
        except httpx.HTTPError as exc:
            raise AuthError(503, f"TokenReview: API server unreachable ({exc})") from exc
        if resp.status_code >= 300:
            raise AuthError(503, f"TokenReview: API server answered {resp.status_code}")
        status = resp.json().get("status") or {}
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        node_values = extra.get(NODE_NAME_EXTRA) or []
        return Principal(
            username=user.get("username", ""),
            groups=frozenset(user.get("groups") or []),
            node=node_values[0] if node_values else None,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
        for name in self.access._tmpfiles:
            Path(name).unlink(missing_ok=True)


@dataclass(frozen=True)
class AuthPolicy:
    """Authorization rules, independent of how the token was checked."""

    agent_users: frozenset[str] = frozenset({DEFAULT_AGENT_SA})
    # Fixed reporters: the shared-storage meter's ServiceAccount (the chart), and the test
    # bed's tokens without a bound node claim. An SA listed here may post usage, always
    # as the name it maps to.
    sa_node_map: Mapping[str, str] = field(default_factory=dict)
    admin_users: frozenset[str] = frozenset()
    admin_groups: frozenset[str] = frozenset({"gpucloud:admins"})

    def is_admin(self, p: Principal) -> bool:
        return p.username in self.admin_users or bool(p.groups & self.admin_groups)

    def agent_node(self, p: Principal) -> str:
        """The node this agent may report for; raise AuthError(403) if it may not post usage."""
        if p.username not in self.agent_users and p.username not in self.sa_node_map:
            raise AuthError(403, f"{p.username!r} is not the agent ServiceAccount")
        # A mapped account always reports as its mapped name, whatever node its pod runs
        # on: the shared-storage meter is one reporter wherever it is scheduled.
        node = self.sa_node_map.get(p.username) or p.node
        if not node:
            raise AuthError(
                403, f"{p.username!r}: token has no bound node and no configured node mapping"
            )
        return node

    def can_access_account(self, p: Principal, account: str) -> bool:
        """Admins, and static tokens' own accounts; everyone else is asked of the
        cluster (``membership.ClusterMembership``)."""
        return self.is_admin(p) or account in p.accounts
