"""Helpers for the chart tests: the real helm binary, rendering, PromQL metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpucloud.testing.testbed import REPO, Binaries

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
PENDING_METRICS = {
    "gpucloud_account_balance",  # gauge {account, currency}: balance in currency units
    "gpucloud_account_in_arrears",  # gauge {account}: 1 while in arrears
    "gpucloud_account_cost_per_hour",  # gauge {account, currency}: current accrual rate
}
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
