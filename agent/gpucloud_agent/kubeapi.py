"""GETs on the Kubernetes API server, on the standard library: the agent reads the pods
of its node (their UIDs: ``pods.KubeUidResolver``) and, with ``--fake-from-kube``, its
Node. The kubernetes client cost the agent 32 MiB of memory for these two calls
(issue 20).

In a pod (no ``--kubeconfig``): ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``
with the ServiceAccount's CA and token, the token read again for every request (projected
tokens are rotated on disk). With ``--kubeconfig``: its current context, read by
``gpucloud.cli.kubeconfig`` (token, tokenFile or exec plugin; client certificate; CA).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from gpucloud.cli import kubeconfig
from gpucloud_agent.httpclient import HttpClient

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeApiError(RuntimeError):
    """The API server refused, or the configuration to reach it is missing."""


class KubeApi:
    def __init__(
        self,
        server: str,
        ssl_context: ssl.SSLContext | None,
        token: Callable[[], str | None],
        timeout_s: float = 10.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.client = HttpClient(timeout_s, ssl_context)

    @classmethod
    def in_cluster(
        cls, directory: Path = IN_CLUSTER_DIR, env: Mapping[str, str] = os.environ
    ) -> KubeApi:
        host = env.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise KubeApiError("not in a pod (KUBERNETES_SERVICE_HOST is unset): give --kubeconfig")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        tls = ssl.create_default_context(cafile=str(directory / "ca.crt"))
        token_file = directory / "token"
        return cls(f"https://{host}:{port}", tls, lambda: token_file.read_text().strip())

    @classmethod
    def from_kubeconfig(cls, path: str) -> KubeApi:
        try:
            ctx = kubeconfig.load(Path(path))
        except kubeconfig.KubeconfigError as exc:
            raise KubeApiError(str(exc)) from exc
        if ctx is None or not ctx.server:
            raise KubeApiError(f"kubeconfig {path}: the current context names no server")
        tls = None
        if ctx.server.startswith("https://"):
            ca = ctx.verify if isinstance(ctx.verify, str) else None
            tls = ssl.create_default_context(cafile=ca)
            if ctx.verify is False:  # insecure-skip-tls-verify
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
            if ctx.cert:
                tls.load_cert_chain(*ctx.cert)
        token = ctx.token
        return cls(ctx.server, tls, lambda: token)

    @classmethod
    def from_flags(cls, kubeconfig_path: str | None) -> KubeApi:
        """``--kubeconfig`` if given, else the pod's ServiceAccount."""
        return cls.from_kubeconfig(kubeconfig_path) if kubeconfig_path else cls.in_cluster()

    def get(self, path: str, **params: str) -> Any:
        """The JSON of ``GET path?params``; KubeApiError unless 200, httpclient.HTTPError
        without an answer."""
        url = self.server + quote(path) + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json"}
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        resp = self.client.get(url, headers)
        if resp.status_code != 200:
            raise KubeApiError(f"GET {path}: HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    def node(self, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """A Node's labels and capacity."""
        obj = self.get(f"/api/v1/nodes/{name}")
        return obj["metadata"].get("labels") or {}, obj.get("status", {}).get("capacity") or {}
