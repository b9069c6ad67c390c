"""Credentials from a kubeconfig: token, tokenFile, exec plugin; errors name the field."""

from __future__ import annotations

import base64
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpucloud.cli import kubeconfig
from gpucloud.cli.kubeconfig import KubeconfigError


def write(tmp: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "contexts": [
            {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "acme"}},
            {"name": "other", "context": {"cluster": "c", "user": "nobody"}},
        ],
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://k8s.example:6443"}}],
        "users": [{"name": "u", "user": user}, {"name": "nobody", "user": {}}],
    }
    path = tmp / "config"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_static_token_server_and_namespace(tmp_path: Path) -> None:
    ctx = kubeconfig.load(write(tmp_path, {"token": "abc"}))
    assert ctx is not None
    assert (ctx.server, ctx.namespace, ctx.token, ctx.verify) == (
        "https://k8s.example:6443", "acme", "abc", True,
    )  # fmt: skip


def test_another_context_and_its_default_namespace(tmp_path: Path) -> None:
    ctx = kubeconfig.load(write(tmp_path, {"token": "abc"}), context="other")
    assert ctx is not None and ctx.token is None and ctx.namespace == "default"


def test_a_token_file_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    ctx = kubeconfig.load(write(tmp_path, {"tokenFile": "tok"}))
    assert ctx is not None and ctx.token == "from-file"


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match=r"users.user.tokenFile"):
        kubeconfig.load(write(tmp_path, {"tokenFile": "missing"}))


def plugin(tmp: Path, body: str) -> Path:
    script = tmp / "plugin.py"
    script.write_text(f"import json, os, sys\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_an_exec_plugin_gets_exec_info_and_its_token_is_used(tmp_path: Path) -> None:
    script = plugin(
        tmp_path,
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['kind'] == 'ExecCredential', info\n"
        "print(json.dumps({'kind': 'ExecCredential', "
        "'status': {'token': 'exec-' + os.environ['TEAM']}}))",
    )
    user = {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
        "args": [str(script)], "env": [{"name": "TEAM", "value": "acme"}],
    }}  # fmt: skip
    ctx = kubeconfig.load(write(tmp_path, user))
    assert ctx is not None and ctx.token == "exec-acme"


def test_a_failing_or_silent_exec_plugin_is_an_error_naming_exec(tmp_path: Path) -> None:
    bad = plugin(tmp_path, "sys.stderr.write('login expired'); sys.exit(3)")
    user = {"exec": {"command": sys.executable, "args": [str(bad)]}}
    with pytest.raises(KubeconfigError, match=r"users.user.exec: .* exited 3: login expired"):
        kubeconfig.load(write(tmp_path, user))
    silent = plugin(tmp_path, "print(json.dumps({'status': {}}))")
    user = {"exec": {"command": sys.executable, "args": [str(silent)]}}
    with pytest.raises(KubeconfigError, match=r"no ExecCredential with status.token"):
        kubeconfig.load(write(tmp_path, user))


def test_ca_data_becomes_a_file_and_insecure_skips_verification(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    cluster = {"server": "https://x", "certificate-authority-data": base64.b64encode(pem).decode()}
    ctx = kubeconfig.load(write(tmp_path, {"token": "t"}, cluster))
    assert ctx is not None and isinstance(ctx.verify, str)
    assert Path(ctx.verify).read_bytes() == pem
    ctx = kubeconfig.load(
        write(tmp_path, {"token": "t"}, {"server": "https://x", "insecure-skip-tls-verify": True})
    )
    assert ctx is not None and ctx.verify is False


def test_no_kubeconfig_is_no_context_but_a_broken_one_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert kubeconfig.load() is None
    path = tmp_path / "config"
    path.write_text(json.dumps({"contexts": []}))
    with pytest.raises(KubeconfigError, match="current-context is not set"):
        kubeconfig.load(path)
    with pytest.raises(KubeconfigError, match="contexts: no entry named 'prod'"):
        kubeconfig.load(write(tmp_path, {"token": "t"}), context="prod")


def test_client_certificates_for_the_api_server(tmp_path: Path) -> None:
    user = {
        "client-certificate-data": base64.b64encode(b"CERT").decode(),
        "client-key": "key.pem",
    }
    ctx = kubeconfig.load(write(tmp_path, user))
    assert ctx is not None and ctx.token is None and ctx.cert is not None
    cert, key = ctx.cert
    assert Path(cert).read_bytes() == b"CERT" and stat.S_IMODE(Path(cert).stat().st_mode) == 0o600
    assert key == str(tmp_path / "key.pem")
