"""Every metric the dashboard and the alerts query is one the project exports, and every
expression parses as PromQL (promtool)."""

from __future__ import annotations

from pathlib import Path

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
        "gpucloud_agent_wal_backlog_records",
        "gpucloud_agent_samples_total",
    ):
        assert needed in used, needed


def test_alert_metrics_are_exported(tmp_path: Path) -> None:
    _, exprs = rule_exprs(tmp_path)
    used = check_known(exprs)
    assert {"up", "gpucloud_agent_wal_backlog_records", "gpucloud_account_in_arrears"} <= used


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
    } <= names
    proc = promtool_check(tmp_path, groups)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
