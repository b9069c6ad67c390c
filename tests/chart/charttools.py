"""Helpers for the chart tests: the real helm binary, rendering, installing into the test
bed, the chart's identities as real tokens, PromQL metric names."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpucloud.testing.testbed import REPO, Binaries, Testbed

CHART = REPO / "charts" / "gpucloud"
DASHBOARD = CHART / "dashboards" / "gpucloud-overview.json"
# Where the metric definitions live, per exporter.
METRIC_SOURCES = [
    REPO / "agent" / "gpucloud_agent" / "metrics.py",
    REPO / "src" / "gpucloud" / "api" / "metrics.py",
    REPO / "gateway" / "gpucloud_gateway" / "app.py",
    REPO / "operator" / "gpucloud_operator",
    REPO / "src" / "gpucloud" / "ledger",
]
# Series Prometheus itself produces for every target.
PROMETHEUS_BUILTIN = {"up"}
# Names the dashboard and the alerts use that no component exports yet (asked of the
# lead). test_pending_metrics_are_really_missing fails once one is exported, so that
# this list only ever shrinks.
PENDING_METRICS: set[str] = set()
# Suffixes client_python adds to a family's name in the exposition.
SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_info")


def helm_binary() -> Path:
    """The test bed's helm (built from Go modules), else one on PATH; skip if none."""
    built = Binaries.from_cache().helm
    if built.is_file():
        return built
    found = shutil.which("helm")
    if found:
        return Path(found)
    pytest.skip(f"helm is not built yet ({built}); run: make testbed-build")


def helm_env(tmp: Path) -> dict[str, str]:
    """helm keeps caches and config under these; never the user's own."""
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(tmp / var.lower())
    return env


def helm(
    *args: str, tmp: Path, kubeconfig: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    cmd = [str(helm_binary()), *args]
    if kubeconfig is not None:
        cmd += ["--kubeconfig", str(kubeconfig)]
    return subprocess.run(
        cmd, env=helm_env(tmp), text=True, capture_output=True, timeout=timeout, check=False
    )


def render(tmp: Path, *set_args: str, release: str = "gpucloud") -> list[dict[str, Any]]:
    """`helm template` with the given --set style args; the parsed documents."""
    proc = helm(
        "template", release, str(CHART), "--namespace", "gpucloud-system", *set_args, tmp=tmp
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, (
        f"expected one {kind} *{name_suffix}, got {[h['metadata'] for h in hits]}"
    )
    return hits[0]


# --- the test bed: install, identities -----------------------------------------------------
KOPF_CRDS = CHART / "crds" / "kopf" / "kopf.dev_peerings.yaml"


def ensure_kopf_crds(tb: Testbed) -> None:
    """The chart installs with --skip-crds into the shared test bed; Kopf's peering CRDs
    are added if missing (gpucloud's are the `testbed` fixture's) and never deleted."""
    tb.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(KOPF_CRDS))
    tb.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev", timeout=70,
    )  # fmt: skip


def install(tb: Testbed, release: str, namespace: str, tmp: Path, *set_args: str) -> None:
    """`helm install` of the chart into the test bed (CRDs skipped: shared)."""
    ensure_kopf_crds(tb)
    proc = helm(
        "install", release, str(CHART), "--namespace", namespace, "--skip-crds", *set_args,
        tmp=tmp, kubeconfig=tb.kubeconfig, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def uninstall(tb: Testbed, release: str, namespace: str, tmp: Path) -> None:
    proc = helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s",
                tmp=tmp, kubeconfig=tb.kubeconfig, timeout=90)  # fmt: skip
    assert proc.returncode == 0 or "not found" in proc.stderr, proc.stderr


def mint_token(
    tb: Testbed,
    service_account: str,
    namespace: str,
    *,
    audience: str | None = None,
    bound_pod: str | None = None,
) -> str:
    """A real ServiceAccount token from the API server (TokenRequest), as a pod would get
    it projected: optionally for an audience and bound to a pod (hence to its node: the
    API server puts the node's name into the token and into TokenReview's answer)."""
    args = ["create", "token", service_account, "-n", namespace, "--duration=1h"]
    if audience:
        args.append(f"--audience={audience}")
    if bound_pod:
        args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"]
    return tb.kubectl(*args).stdout.strip()


class Identity:
    """One identity as its own kubeconfig: the test bed's API server and CA, a bearer token
    and nothing else (no client certificate, no impersonation)."""

    def __init__(self, tb: Testbed, name: str, token: str, directory: Path) -> None:
        self.tb, self.name, self.token = tb, name, token
        admin = yaml.safe_load(tb.kubeconfig.read_text())
        cluster = admin["clusters"][0]["cluster"]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testbed", "cluster": cluster}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "testbed", "user": name}}],
            "current-context": name,
        }
        self.kubeconfig = directory / f"kubeconfig-{name}.yaml"
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    @property
    def username(self) -> str:
        """The `sub` of the token (a JWT), e.g. system:serviceaccount:NS:NAME."""
        payload = self.token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.tb.bin.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return subprocess.run(
            cmd, input=input, env=env, text=True, capture_output=True, timeout=60, check=False
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        proc = self.kubectl(*args, input=input)
        assert proc.returncode == 0, f"{self.name}: kubectl {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def forbidden(self, *args: str, input: str | None = None) -> str:
        """The API server answers 403 (authenticated, not authorized)."""
        proc = self.kubectl(*args, input=input)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (
            f"{self.name} was not refused: kubectl {' '.join(args)}: {proc.stdout}{proc.stderr}"
        )
        return proc.stderr


# --- PromQL ------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_NAME = re.compile(r"\b(gpucloud_[a-z0-9_]+|up)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: ours (gpucloud_*) and Prometheus's `up`.
    Strings and label matchers are removed first, so label values never count."""
    bare = _MATCHERS.sub("", _STRING.sub('""', expr))
    return set(_NAME.findall(bare))


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    doc = json.loads(path.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if t.get("expr")]


def grafana_to_promql(expr: str) -> str:
    """Grafana's interval variables -> a literal duration, so promtool can parse it."""
    return re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)


def exported_metrics() -> set[str]:
    """Family names the project's code defines, with the suffixes the exposition adds."""
    names: set[str] = set()
    for src in METRIC_SOURCES:
        files = sorted(src.rglob("*.py")) if src.is_dir() else [src]
        for f in files:
            names |= set(re.findall(r"[\"'](gpucloud_[a-z0-9_]+)[\"']", f.read_text()))
    return names | {n + s for n in names for s in SUFFIXES}


def promtool_check(tmp: Path, groups: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps)")
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], text=True, capture_output=True, timeout=60
    )
