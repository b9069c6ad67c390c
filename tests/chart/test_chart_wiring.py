"""The env vars and args the chart sets are the ones the components really read: each
component's own parser is run on the rendered container spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from charttools import find, render


def plain_env(container: dict[str, Any], **overrides: str) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env | overrides


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(
        tmp_path_factory.mktemp("helm"),
        "--set", "operator.config.tick_interval_s=7",
        "--set", "operator.config.storage_settlement_s=1800",
    )  # fmt: skip


def container(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    return find(docs, kind, suffix)["spec"]["template"]["spec"]["containers"][0]


def test_operator_reads_the_chart_settings(docs: list[dict[str, Any]]) -> None:
    from gpucloud_operator.config import OperatorConfig
    from gpucloud_operator.main import parse_args

    c = container(docs, "Deployment", "-operator")
    cfg = OperatorConfig.from_env(plain_env(c))
    assert cfg.ledger_url == "sqlite:////var/lib/gpucloud/ledger/ledger.db"
    assert cfg.tick_interval_s == 7 and cfg.storage_settlement_s == 1800
    assert cfg.reminder_lead_s == 7 * 24 * 3600 and cfg.pricebook == "default"
    args, _ = parse_args(c["args"])
    assert args.peering == "gpucloud" and args.all_namespaces and not args.standalone
    # /metrics on the port the container declares and the Service targets.
    assert cfg.metrics_port == 9401
    assert {"name": "metrics", "containerPort": 9401} in c["ports"]
    service = find(docs, "Service", "-operator")["spec"]["ports"]
    assert service == [{"name": "metrics", "port": 9401, "targetPort": "metrics"}]


def test_api_reads_the_chart_settings(
    docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpucloud.api.main import parse_args

    c = container(docs, "Deployment", "-api")
    for key, value in plain_env(c).items():
        monkeypatch.setenv(key, value)
    args = parse_args(c["args"])
    assert (args.host, args.port, args.ops_port) == ("0.0.0.0", 8080, 9090)
    assert {"name": "ops", "containerPort": 9090} in c["ports"]
    assert args.database_url == "sqlite:////var/lib/gpucloud/ledger/ledger.db"
    assert args.token_audiences == "gpucloud-api"
    assert args.agent_sa == "system:serviceaccount:gpucloud-system:gpucloud-agent"
    assert args.pricebook == "/etc/gpucloud/pricebook/pricebook.yaml"
    assert args.voucher_dir == "/var/lib/gpucloud/vouchers"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/gpucloud/pricebook", "/var/lib/gpucloud/vouchers"} <= mounts


def test_agent_reads_the_chart_settings(
    docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpucloud_agent.main import build_parser

    c = container(docs, "DaemonSet", "-agent")
    for key, value in plain_env(c, GPUCLOUD_AGENT_NODE_NAME="gpu-a100-0").items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args([])
    assert args.node_name == "gpu-a100-0"
    assert args.api_url == "http://gpucloud-api.gpucloud-system.svc:8080"
    assert args.nvml == "real" and args.pod_uid_source == "kube"
    assert args.token_file == "/var/run/secrets/gpucloud/token"
    assert args.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert args.wal_dir == "/var/lib/gpucloud-agent/wal"
    assert args.disk_root == "/var/lib/gpucloud"
    assert int(args.metrics_port) == 9400 and float(args.sample_period) == 1.0
    assert float(args.series_retention) == 3600.0
    # Every path the agent uses lies in a mounted volume.
    mounts = [m["mountPath"] for m in c["volumeMounts"]]
    for path in (args.token_file, args.pod_resources_socket, args.wal_dir, args.disk_root):
        assert any(Path(path).is_relative_to(m) for m in mounts), path


def test_gateway_args(docs: list[dict[str, Any]]) -> None:
    c = container(docs, "Deployment", "-gateway")
    assert "--config=/etc/gpucloud/gateway/gateway.yaml" in c["args"]
    assert "/etc/gpucloud/gateway" in {m["mountPath"] for m in c["volumeMounts"]}
