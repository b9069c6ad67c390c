"""The agent's standard-library Kubernetes reads (pod UIDs, --fake-from-kube's Node) over
TLS: in a pod (ServiceAccount CA and a rotated token) and with a kubeconfig (inline CA
and client certificate, as kwokctl writes them). The kwok test bed's real API server
reads them in tests/e2e/test_agent_on_testbed.py."""

from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from agent_testkit import make_pki, send_json
from gpucloud_agent.kubeapi import KubeApi, KubeApiError
from gpucloud_agent.main import main
from gpucloud_agent.pods import KubeUidResolver


class ApiServer:
    """GET /api/v1/pods (by spec.nodeName) and /api/v1/nodes/<name>, over TLS; a client
    certificate or the bearer token ``token`` is required."""

    def __init__(self, pki: Path) -> None:
        self.token = "sa-token-1"
        self.pods: list[tuple[str, str, str, str]] = []  # node, namespace, name, uid
        self.seen: list[tuple[str, str]] = []  # (path with query, Authorization)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization", "")
                api.seen.append((self.path, auth))
                has_cert = self.connection.getpeercert() is not None  # type: ignore[attr-defined]
                if auth != f"Bearer {api.token}" and not has_cert:
                    return self._send(401, {"kind": "Status", "reason": "Unauthorized"})
                url = urlsplit(self.path)
                if url.path == "/api/v1/pods":
                    node = parse_qs(url.query)["fieldSelector"][0].removeprefix("spec.nodeName=")
                    items = [{"metadata": {"namespace": ns, "name": n, "uid": uid, "labels": {}}}
                             for on, ns, n, uid in api.pods if on == node]  # fmt: skip
                    return self._send(200, {"kind": "PodList", "items": items})
                if url.path == "/api/v1/nodes/node-a":
                    meta = {"name": "node-a", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}}
                    status = {"capacity": {"nvidia.com/gpu": "2"}}
                    return self._send(200, {"metadata": meta, "status": status})
                self._send(404, {"kind": "Status", "reason": "NotFound"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                send_json(self, code, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
        tls.load_cert_chain(pki / "server.crt", pki / "server.key")
        tls.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, or a token
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.port = self.http.server_port

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


@pytest.fixture
def api(pki: Path) -> Iterator[ApiServer]:
    server = ApiServer(pki)
    yield server
    server.close()


def test_in_a_pod_with_the_service_accounts_ca_and_rotated_token(
    tmp_path: Path, pki: Path, api: ApiServer
) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    (sa / "token").write_text("sa-token-1\n")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
    kube = KubeApi.in_cluster(sa, env)
    api.pods = [("node-a", "team", "job", "uid-1"), ("node-b", "team", "other", "uid-2")]
    resolver = KubeUidResolver("node-a", min_refresh_s=0, api=kube)
    assert resolver.uid("team", "job") == "uid-1"
    assert resolver.uid("team", "other") is None  # another node's pod
    assert api.seen[0] == (
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a",
        "Bearer sa-token-1",
    )
    # the kubelet rotates the projected token: the next request carries the new one
    api.token = "sa-token-2"
    (sa / "token").write_text("sa-token-2\n")
    api.pods.append(("node-a", "team", "new", "uid-3"))
    assert resolver.uid("team", "new") == "uid-3"
    assert api.seen[-1][1] == "Bearer sa-token-2"
    with pytest.raises(KubeApiError, match=r"KUBERNETES_SERVICE_HOST is unset"):
        KubeApi.in_cluster(sa, {})


def test_with_a_kubeconfig_of_inline_certificates(
    tmp_path: Path, pki: Path, api: ApiServer
) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "kwok",
        "contexts": [{"name": "kwok", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{api.port}",
                                                "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64("client.crt"),
                                         "client-key-data": b64("client.key")}}],
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    kube = KubeApi.from_flags(str(path))
    assert kube.node("node-a") == ({"nvidia.com/gpu.product": "NVIDIA-L4"}, {"nvidia.com/gpu": "2"})
    assert api.seen[-1] == ("/api/v1/nodes/node-a", "")  # the client certificate, no token
    with pytest.raises(KubeApiError, match=r"GET /api/v1/nodes/node-z: HTTP 404"):
        kube.node("node-z")
    # the agent refuses to start with a kubeconfig it cannot use, naming the flag
    config["current-context"] = "nope"
    path.write_text(yaml.safe_dump(config))
    argv = ["run", "--node-name", "node-a", "--api-url", "http://127.0.0.1:9", "--nvml", "none",
            "--pod-uid-source", "kube", "--kubeconfig", str(path)]  # fmt: skip
    assert main(argv) == 2
