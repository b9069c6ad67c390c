"""Every metric the dashboard and the alerts query is one the project exports, and every
expression parses as PromQL (promtool). The operator's exposition itself is checked here
too; a real Prometheus scraping the real operator is in test_chart_identities_e2e.py."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from charttools import (
    PENDING_METRICS,
    PROMETHEUS_BUILTIN,
    dashboard_exprs,
    exported_metrics,
    find,
    grafana_to_promql,
    metric_names,
    promtool_check,
    render,
)
from prometheus_client import generate_latest


def rule_exprs(tmp: Path) -> tuple[list[dict], list[str]]:
    docs = render(tmp, "--set", "monitoring.prometheusRule.enabled=true")
    groups = find(docs, "PrometheusRule")["spec"]["groups"]
    return groups, [r["expr"] for g in groups for r in g["rules"]]


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (namespace) (rate(gpucloud_gpu_allocated_seconds_total{job=~"gpucloud_x"}[5m]))'
        " / on (gpu_uuid) group_left () max(gpucloud_gpu_utilization_ratio) + up"
    )
    assert metric_names(expr) == {
        "gpucloud_gpu_allocated_seconds_total",
        "gpucloud_gpu_utilization_ratio",
        "up",
    }


def check_known(exprs: list[str]) -> set[str]:
    known = exported_metrics() | PROMETHEUS_BUILTIN | PENDING_METRICS
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= known, f"{expr!r} uses metrics nobody exports: {names - known}"
        used |= names
    return used


def test_dashboard_metrics_are_exported() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    used = check_known(exprs)
    # The panels the dashboard promises, by the metrics they stand on.
    for needed in (
        "gpucloud_gpu_utilization_ratio",
        "gpucloud_gpu_allocated_seconds_total",
        "gpucloud_account_cost_per_hour",
        "gpucloud_account_balance",
        "gpucloud_account_in_arrears",
        "gpucloud_account_available_balance",
        "gpucloud_account_data_deletion_timestamp_seconds",
        "gpucloud_operator_instances",
        "gpucloud_agent_wal_backlog_records",
        "gpucloud_agent_samples_total",
    ):
        assert needed in used, needed


def test_alert_metrics_are_exported(tmp_path: Path) -> None:
    _, exprs = rule_exprs(tmp_path)
    used = check_known(exprs)
    assert {
        "up",
        "gpucloud_agent_wal_backlog_records",
        "gpucloud_account_in_arrears",
        "gpucloud_account_data_deletion_timestamp_seconds",
    } <= used


def test_pending_metrics_are_really_missing() -> None:
    """Once a component exports one of these, drop it from PENDING_METRICS."""
    assert PENDING_METRICS.isdisjoint(exported_metrics())


def test_dashboard_exprs_parse_with_promtool(tmp_path: Path) -> None:
    rules = [
        {"record": f"gpucloud:dashboard_expr_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(dashboard_exprs())
    ]
    proc = promtool_check(tmp_path, [{"name": "dashboard", "rules": rules}])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    groups, _ = rule_exprs(tmp_path)
    names = {r["alert"] for g in groups for r in g["rules"]}
    assert {
        "GpucloudAgentDown",
        "GpucloudAgentShippingBacklog",
        "GpucloudAccountInArrears",
        "GpucloudAccountDataDeletionSoon",
    } <= names
    proc = promtool_check(tmp_path, groups)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_operator_exposition() -> None:
    """The operator's gauges: money in major units, arrears 0/1, the deletion instant only
    while in arrears, instances by phase (every phase, zeros included), stale accounts
    dropped; and promtool's linter has nothing to say about it."""
    from gpucloud_operator.metrics import PHASES, OperatorMetrics

    m = OperatorMetrics(stale_after_s=60)
    deletion = datetime(2026, 1, 8, tzinfo=UTC)
    m.accounts.observe(
        "acme",
        "CNY",
        balance_minor=-1234,
        available_minor=-2000,
        cost_per_hour=Decimal("5.22"),
        in_arrears=True,
        data_deletion_at=deletion,
    )
    m.accounts.observe(
        "lab",
        "CNY",
        balance_minor=100_00,
        available_minor=99_50,
        cost_per_hour=Decimal(0),
        in_arrears=False,
        data_deletion_at=deletion,
    )
    instances = [
        {"metadata": {"namespace": "acme"}, "status": {"phase": "Running"}},
        {"metadata": {"namespace": "acme"}, "status": {"phase": "Running"}},
        {"metadata": {"namespace": "acme"}},  # not reconciled yet
        {"metadata": {"namespace": "elsewhere"}, "status": {"phase": "Running"}},
    ]
    m.count_instances(lambda: instances, lambda ns: ns == "acme")
    m.spot.notices.labels("NVIDIA-L40S").inc()
    m.spot.resumes.labels("NVIDIA-L40S").inc()
    text = generate_latest(m.registry).decode()
    for line in (
        'gpucloud_account_balance{account="acme",currency="CNY"} -12.34',
        'gpucloud_account_available_balance{account="lab",currency="CNY"} 99.5',
        'gpucloud_account_cost_per_hour{account="acme",currency="CNY"} 5.22',
        'gpucloud_account_in_arrears{account="acme"} 1.0',
        'gpucloud_account_in_arrears{account="lab"} 0.0',
        'gpucloud_operator_instances{phase="Running"} 2.0',
        'gpucloud_operator_instances{phase="Pending"} 1.0',
        'gpucloud_operator_instances{phase="Stopped"} 0.0',
        'gpucloud_operator_instances{phase="Queued"} 0.0',
        'gpucloud_spot_preemption_notices_total{product="NVIDIA-L40S"} 1.0',
        'gpucloud_spot_resumes_total{product="NVIDIA-L40S"} 1.0',
    ):
        assert line in text, (line, text)
    deletions = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpucloud_account_data_deletion_timestamp_seconds{")
    ]
    assert deletions == [deletion.timestamp()]  # acme's only: lab is not in arrears
    assert text.count("gpucloud_operator_instances{") == len(PHASES)
    promtool = shutil.which("promtool")
    if promtool is not None:
        out = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=30)  # fmt: skip
        assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr

    m.accounts.stale_after_s = 0  # no pass recorded since: the accounts drop out
    assert "gpucloud_account_balance{" not in generate_latest(m.registry).decode()


def test_operator_metrics_port_setting() -> None:
    from gpucloud_operator.config import OperatorConfig

    assert OperatorConfig().metrics_port == 0  # off unless asked for
    cfg = OperatorConfig.from_env({"GPUCLOUD_OPERATOR_METRICS_PORT": "9401"})
    assert cfg.metrics_port == 9401
    with pytest.raises(
        ValueError, match="metrics_port: Input should be less than or equal to 65535"
    ):
        OperatorConfig.from_env({"GPUCLOUD_OPERATOR_METRICS_PORT": "70000"})
