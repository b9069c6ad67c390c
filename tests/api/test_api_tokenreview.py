"""The TokenReview authenticator against a tiny local server speaking the TokenReview API."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from apihelpers import auth, gpu_record
from fastapi.testclient import TestClient

from gpucloud.api import Settings
from gpucloud.api.app import create_app
from gpucloud.api.auth import (
    DEFAULT_AGENT_SA,
    NODE_NAME_EXTRA,
    AuthError,
    AuthPolicy,
    ClusterAccess,
    FileToken,
    Principal,
    TokenReviewAuthenticator,
)

API_SERVER_TOKEN = "api-server-credential"
# token -> TokenReview status.user
USERS: dict[str, dict[str, Any]] = {
    "bound-agent": {
        "username": DEFAULT_AGENT_SA,
        "groups": ["system:serviceaccounts"],
        "extra": {NODE_NAME_EXTRA: ["gpu-node-1"]},
    },
    "unbound-agent": {"username": "system:serviceaccount:testbed:agent-2"},
    "other-sa": {"username": "system:serviceaccount:default:default"},
}


class FakeApiServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.credentials = {API_SERVER_TOKEN}  # the bearer tokens it takes (rotation: two)
        self.auths: list[str | None] = []  # each request's Authorization header
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.send_response(404)
                    self.end_headers()
                    return
                client_cert = tls is not None and self.connection.getpeercert()  # type: ignore[attr-defined]
                outer.auths.append(self.headers.get("Authorization"))
                token_ok = outer.auths[-1] in {f"Bearer {t}" for t in outer.credentials}
                if not (token_ok or client_cert):
                    self.send_response(401)
                    self.end_headers()
                    return
                outer.reviews.append(body)
                user = USERS.get(body["spec"]["token"])
                status = {"authenticated": True, "user": user} if user else {"authenticated": False}
                out = json.dumps({**body, "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


def _review_then_stop(
    srv: FakeApiServer,
    access: Callable[[], ClusterAccess],
    review: Callable[[TokenReviewAuthenticator], Awaitable[None]],
) -> None:
    """Run ``review`` with an authenticator over ``access()`` (built inside the loop, as
    the API builds it), then close it and stop the server of a test's own."""

    async def go() -> None:
        authn = TokenReviewAuthenticator(access())
        try:
            await review(authn)
        finally:
            await authn.aclose()

    try:
        asyncio.run(go())
    finally:
        srv.server.shutdown()


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    srv.thread.start()
    yield srv
    srv.server.shutdown()


@pytest.fixture
def kubeconfig(tmp_path: Path, apiserver: FakeApiServer) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "c", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "u", "user": {"token": API_SERVER_TOKEN}}],
                "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


def test_tokenreview_principal_and_cache(kubeconfig: Path, apiserver: FakeApiServer) -> None:
    async def go() -> None:
        authn = TokenReviewAuthenticator(
            ClusterAccess.from_kubeconfig(kubeconfig), audiences=["gpucloud"], cache_ttl_s=60
        )
        p = await authn.authenticate("bound-agent")
        assert p is not None and p.username == DEFAULT_AGENT_SA and p.node == "gpu-node-1"
        assert await authn.authenticate("bound-agent") == p
        assert await authn.authenticate("nope") is None
        assert await authn.authenticate("nope") is None
        await authn.aclose()

    asyncio.run(go())
    assert [r["spec"]["token"] for r in apiserver.reviews] == ["bound-agent", "nope"]
    assert apiserver.reviews[0]["spec"]["audiences"] == ["gpucloud"]
    assert apiserver.reviews[0]["apiVersion"] == "authentication.k8s.io/v1"


def test_unreachable_api_server_is_503_not_401(tmp_path: Path) -> None:
    async def go() -> None:
        authn = TokenReviewAuthenticator(ClusterAccess(server="http://127.0.0.1:9"))
        with pytest.raises(AuthError) as err:
            await authn.authenticate("x")
        assert err.value.status == 503
        await authn.aclose()

    asyncio.run(go())


def test_usage_only_for_the_token_node(kubeconfig: Path, db_url: str) -> None:
    policy = AuthPolicy(sa_node_map={"system:serviceaccount:testbed:agent-2": "gpu-node-2"})
    settings = Settings(
        database_url=db_url,
        authenticator=TokenReviewAuthenticator(ClusterAccess.from_kubeconfig(kubeconfig)),
        policy=policy,
    )
    with TestClient(create_app(settings)) as client:
        post = lambda token, node: client.post(  # noqa: E731
            "/v1/usage", json={"records": [gpu_record(node=node)]}, headers=auth(token)
        )
        assert post("bound-agent", "gpu-node-1").status_code == 200
        # another node's record: refused on its own (422: nothing else in the batch)
        assert post("bound-agent", "gpu-node-2").json()["errors"][0]["rule"] == "wrong_node"
        assert post("unbound-agent", "gpu-node-2").status_code == 200  # via the SA->node map
        assert post("unbound-agent", "gpu-node-1").status_code == 422
        assert post("other-sa", "gpu-node-1").status_code == 403
        assert post("nope", "gpu-node-1").status_code == 401


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (like kwok's)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}/O=system:masters", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


def test_kubeconfig_with_inline_tls_material(tmp_path: Path) -> None:
    """TLS with the CA and a client certificate given inline (``*-data``), as kwokctl
    writes them: the API server requires the client certificate."""
    _pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    tls.verify_mode = ssl.CERT_REQUIRED
    srv = FakeApiServer(tls)
    srv.thread.start()
    b64 = lambda name: base64.b64encode((tmp_path / name).read_bytes()).decode()  # noqa: E731
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "kwok",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": srv.url, "certificate-authority-data": b64("ca.crt")},
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "client-certificate-data": b64("client.crt"),
                            "client-key-data": b64("client.key"),
                        },
                    }
                ],
                "contexts": [{"name": "kwok", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )

    async def review(authn: TokenReviewAuthenticator) -> None:
        p = await authn.authenticate("bound-agent")
        assert p is not None and p.node == "gpu-node-1"

    _review_then_stop(srv, lambda: ClusterAccess.from_kubeconfig(kubeconfig), review)
    assert len(srv.reviews) == 1


def test_a_mapped_account_reports_as_its_mapped_name_wherever_it_runs() -> None:
    """The shared-storage meter's pod has a token bound to whatever node it landed on;
    it reports as its one reporter name, never as that node."""
    meter = "system:serviceaccount:gpucloud:gpucloud-storage-meter"
    policy = AuthPolicy(sa_node_map={meter: "gpucloud-shared-storage"})
    assert policy.agent_node(Principal(meter, node="worker-1")) == "gpucloud-shared-storage"
    assert policy.agent_node(Principal(DEFAULT_AGENT_SA, node="worker-1")) == "worker-1"


# --- tokens read from a file (projected ServiceAccount tokens, rotated by the kubelet) ---


def _kubeconfig_with_token_file(path: Path, server: str, token_file: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "test",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                # both: as client-go does, the file wins over the literal token
                "users": [{"name": "u", "user": {"tokenFile": token_file, "token": "stale"}}],
                "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


def test_a_rotated_token_file_is_read_again_on_401_and_the_request_retried_once(
    tmp_path: Path, apiserver: FakeApiServer
) -> None:
    (tmp_path / "token").write_text("token-1\n")
    apiserver.credentials = {"token-1"}
    # a relative tokenFile: next to the kubeconfig, as kubectl reads it
    kubeconfig = _kubeconfig_with_token_file(tmp_path / "kubeconfig", apiserver.url, "token")

    async def go() -> None:
        authn = TokenReviewAuthenticator(ClusterAccess.from_kubeconfig(kubeconfig))
        try:
            assert await authn.authenticate("bound-agent") is not None
            assert apiserver.auths == ["Bearer token-1"]
            # the kubelet writes a new token; the old one expires
            (tmp_path / "token").write_text("token-2\n")
            apiserver.credentials = {"token-2"}
            p = await authn.authenticate("other-sa")
            assert p is not None and p.username == "system:serviceaccount:default:default"
            assert apiserver.auths[1:] == ["Bearer token-1", "Bearer token-2"]  # 401, retry
            assert await authn.authenticate("unbound-agent") is not None
            assert apiserver.auths[3:] == ["Bearer token-2"]  # the new token from now on
            # refused while the file still holds the same token: no retry that would fail
            apiserver.credentials = {"token-3"}
            with pytest.raises(AuthError) as err:
                await authn.authenticate("nope")
            assert err.value.status == 503
            assert apiserver.auths[4:] == ["Bearer token-2"]
        finally:
            await authn.aclose()

    asyncio.run(go())
    assert [r["spec"]["token"] for r in apiserver.reviews] == ["bound-agent", "other-sa",
                                                                "unbound-agent"]  # fmt: skip


def test_the_token_file_is_read_again_every_60_s(tmp_path: Path, apiserver: FakeApiServer) -> None:
    token = tmp_path / "token"
    token.write_text("token-1")
    now = [1000.0]
    access = ClusterAccess(
        server=apiserver.url, token_file=FileToken(token, monotonic=lambda: now[0])
    )
    # a rotation: the kubelet writes a new token; the old one stays valid until it expires
    apiserver.credentials = {"token-1", "token-2"}

    async def go() -> None:
        authn = TokenReviewAuthenticator(access)
        try:
            token.write_text("token-2")
            now[0] += 59.9
            await authn.authenticate("bound-agent")
            now[0] += 0.1
            await authn.authenticate("other-sa")
            await authn.authenticate("unbound-agent")
            # the file gone for a moment: the token in hand is kept
            token.unlink()
            now[0] += 600
            await authn.authenticate("nope")
        finally:
            await authn.aclose()

    asyncio.run(go())
    assert apiserver.auths == ["Bearer token-1", "Bearer token-2", "Bearer token-2",
                               "Bearer token-2"]  # fmt: skip


def test_a_literal_token_stays_as_it_is(kubeconfig: Path) -> None:
    access = ClusterAccess.from_kubeconfig(kubeconfig)
    assert access.token_file is None and access.bearer_token == API_SERVER_TOKEN


def test_in_cluster_reads_the_projected_token_again_after_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's and the gateway's in-cluster access: the ServiceAccount's CA and its
    projected token, which the kubelet rotates."""
    _pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    srv = FakeApiServer(tls)
    srv.credentials = {"sa-token-1"}
    srv.thread.start()
    (tmp_path / "token").write_text("sa-token-1")
    monkeypatch.setattr("gpucloud.api.auth.IN_CLUSTER_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(srv.server.server_address[1]))

    async def review(authn: TokenReviewAuthenticator) -> None:
        assert await authn.authenticate("bound-agent") is not None
        (tmp_path / "token").write_text("sa-token-2")
        srv.credentials = {"sa-token-2"}
        assert await authn.authenticate("other-sa") is not None

    _review_then_stop(srv, ClusterAccess.in_cluster, review)
    assert srv.auths == ["Bearer sa-token-1", "Bearer sa-token-1", "Bearer sa-token-2"]
