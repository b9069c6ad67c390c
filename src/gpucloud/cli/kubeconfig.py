"""Credentials from the current kubeconfig context, read with PyYAML (no Kubernetes client).

What the CLI needs of a kubeconfig: the API server and its CA (for ``gpucloud wait``),
the default namespace, and a bearer token (``token``, ``tokenFile`` or an ``exec``
credential plugin's ``ExecCredential`` output), which the gpucloud API also accepts:
it checks tokens with a TokenReview against the same cluster.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class KubeconfigError(Exception):
    """A kubeconfig that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class KubeContext:
    server: str | None
    namespace: str
    verify: bool | str  # httpx's verify: False, or a CA bundle path
    token: str | None
    cert: tuple[str, str] | None = None  # client certificate and key files (the API server)


def default_paths() -> list[Path]:
    """``$KUBECONFIG`` (the first existing file of the list) or ``~/.kube/config``."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path.home() / ".kube" / "config"]


def load(path: Path | None = None, context: str | None = None) -> KubeContext | None:
    """The chosen (or current) context; None when no kubeconfig exists and none was named."""
    if path is None:
        found = [p for p in default_paths() if p.is_file()]
        if not found:
            return None
        path = found[0]
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KubeconfigError(f"kubeconfig {path}: cannot read it: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a mapping")
    name = context or doc.get("current-context")
    if not name:
        raise KubeconfigError(f"kubeconfig {path}: current-context is not set (give --context)")
    ctx = _named(doc, "contexts", "context", name, path)
    cluster = (
        _named(doc, "clusters", "cluster", ctx.get("cluster"), path) if ctx.get("cluster") else {}
    )
    user = _named(doc, "users", "user", ctx.get("user"), path) if ctx.get("user") else {}
    return KubeContext(
        server=cluster.get("server"),
        namespace=ctx.get("namespace") or "default",
        verify=_verify(cluster, path),
        token=_token(user, path),
        cert=_client_cert(user, path),
    )


def _named(doc: dict[str, Any], section: str, key: str, name: Any, path: Path) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(key) or {}
    raise KubeconfigError(f"kubeconfig {path}: {section}: no entry named {name!r}")


def _verify(cluster: dict[str, Any], path: Path) -> bool | str:
    if cluster.get("insecure-skip-tls-verify"):
        return False
    return _file(cluster, "certificate-authority", path) or True


def _file(section: dict[str, Any], key: str, path: Path) -> str | None:
    """``key`` (a file name) or ``key-data`` (base64, written to a private temporary file:
    httpx reads certificates and keys from files only)."""
    if section.get(key):
        return str(_relative(path, section[key]))
    if section.get(f"{key}-data"):
        data = base64.b64decode(section[f"{key}-data"])
        fd, name = tempfile.mkstemp(suffix=".pem")  # mode 0600: it may be a private key
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
    return None


def _client_cert(user: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """Client certificates authenticate to the Kubernetes API server (``wait``); the
    gpucloud API takes bearer tokens only."""
    cert = _file(user, "client-certificate", path)
    key = _file(user, "client-key", path)
    return (cert, key) if cert and key else None


def _relative(kubeconfig: Path, value: str) -> Path:
    """kubectl resolves relative file names against the kubeconfig's directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else kubeconfig.parent / p


def _token(user: dict[str, Any], path: Path) -> str | None:
    if user.get("token"):
        return str(user["token"])
    if user.get("tokenFile"):
        token_file = _relative(path, user["tokenFile"])
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            raise KubeconfigError(f"kubeconfig {path}: users.user.tokenFile: {exc}") from None
    if user.get("exec"):
        return exec_token(user["exec"], path)
    return None


def exec_token(spec: dict[str, Any], path: Path) -> str:
    """Run a client-go credential plugin and take ``status.token`` of its ExecCredential."""
    command = spec.get("command")
    if not command:
        raise KubeconfigError(f"kubeconfig {path}: users.user.exec.command is required")
    env = dict(os.environ)
    env.update({e["name"]: e["value"] for e in spec.get("env") or []})
    request = {
        "apiVersion": spec.get("apiVersion", "client.authentication.k8s.io/v1"),
        "kind": "ExecCredential",
        "spec": {"interactive": False},
    }
    env["KUBERNETES_EXEC_INFO"] = json.dumps(request)
    try:
        done = subprocess.run(
            [command, *(spec.get("args") or [])],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KubeconfigError(f"kubeconfig {path}: users.user.exec: {exc}") from None
    if done.returncode != 0:
        raise KubeconfigError(
            f"kubeconfig {path}: users.user.exec: {command} exited {done.returncode}: "
            f"{done.stderr.strip()[:300]}"
        )
    try:
        token = (json.loads(done.stdout).get("status") or {}).get("token")
    except (ValueError, AttributeError):
        token = None
    if not token:
        raise KubeconfigError(
            f"kubeconfig {path}: users.user.exec: {command} printed no ExecCredential "
            "with status.token"
        )
    return str(token)
