"""`helm lint` and `helm template` with the real helm: defaults, variants, bad values."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from charttools import CHART, ensure_kopf_crds, find, helm, render

from gpucloud.testing.testbed import REPO, Testbed


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("helm"))


def test_helm_lint(tmp_path: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = helm(
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "database.type=postgresql",
        "--set",
        "database.url=postgresql+psycopg://u:p@db:5432/gpucloud",
        "--set",
        "api.replicas=3",
        tmp=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_objects(defaults: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in defaults}
    for kind, name in [
        ("Deployment", "gpucloud-operator"),
        ("Deployment", "gpucloud-api"),
        ("Deployment", "gpucloud-gateway"),
        ("DaemonSet", "gpucloud-agent"),
        ("Service", "gpucloud-api"),
        ("Service", "gpucloud-gateway"),
        ("Service", "gpucloud-operator"),
        ("ClusterKopfPeering", "gpucloud"),
        ("PriceBook", "default"),
        ("ClusterRole", "gpucloud-billing-admin"),
        ("ConfigMap", "gpucloud-dashboard"),
        ("PersistentVolumeClaim", "gpucloud-ledger"),
    ]:
        assert (kind, name) in kinds, (kind, name)
    for sa in ("operator", "api", "gateway", "agent"):
        assert ("ServiceAccount", f"gpucloud-{sa}") in kinds
        binding = find(defaults, "ClusterRoleBinding", f"gpucloud-{sa}")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"gpucloud-{sa}", "namespace": "gpucloud-system"}
        ]
    # Monitoring CRs only on request (the Prometheus Operator may be absent).
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & {d["kind"] for d in defaults}


def test_pricebook_matches_the_example(defaults: list[dict[str, Any]]) -> None:
    example = yaml.safe_load((REPO / "examples" / "pricebook.yaml").read_text())
    assert find(defaults, "PriceBook")["spec"] == example["spec"]
    served = yaml.safe_load(find(defaults, "ConfigMap", "-pricebook")["data"]["pricebook.yaml"])
    assert served["spec"] == example["spec"]


def test_agent_daemonset(defaults: list[dict[str, Any]]) -> None:
    ds = find(defaults, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "gpucloud-agent"
    (c,) = pod["containers"]
    env = env_of(c)
    assert env["GPUCLOUD_AGENT_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["GPUCLOUD_AGENT_API_URL"] == "http://gpucloud-api.gpucloud-system.svc:8080"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert mounts["pod-resources"]["readOnly"] is True
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/gpucloud"
    assert mounts["data"]["readOnly"] is True
    # only instances/ and images/ are writable: the agent removes the instance folders to
    # wipe, and makes (and removes) the images of its node's instances
    for folder in ("instances", "images"):
        assert volumes[folder]["hostPath"]["path"] == f"/var/lib/gpucloud/{folder}"
        assert mounts[folder]["mountPath"] == f"/var/lib/gpucloud/{folder}"
        assert not mounts[folder].get("readOnly")
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert not any(w.startswith("/var/lib/gpucloud/disks") for w in writable)
    token = volumes["api-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "gpucloud-api"
    assert env["GPUCLOUD_AGENT_TOKEN_FILE"] == "/var/run/secrets/gpucloud/token"
    sc = c["securityContext"]
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["DAC_READ_SEARCH", "DAC_OVERRIDE", "FOWNER"],
    }
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # The API only accepts usage from this ServiceAccount, with this audience.
    api_env = env_of(containers(find(defaults, "Deployment", "-api"))[0])
    assert api_env["GPUCLOUD_AGENT_SA"] == "system:serviceaccount:gpucloud-system:gpucloud-agent"
    assert api_env["GPUCLOUD_TOKEN_AUDIENCES"] == "gpucloud-api"


def test_other_components_run_as_non_root(defaults: list[dict[str, Any]]) -> None:
    for name in ("-operator", "-api", "-gateway"):
        dep = find(defaults, "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["image"] == f"gpucloud/{name[1:]}:0.1.0"


def test_operator_deployment(defaults: list[dict[str, Any]]) -> None:
    dep = find(defaults, "Deployment", "-operator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    (c,) = containers(dep)
    assert "--peering=gpucloud" in c["args"]
    env = env_of(c)
    assert env["GPUCLOUD_LEDGER_URL"] == "sqlite:////var/lib/gpucloud/ledger/ledger.db"
    assert env["GPUCLOUD_OPERATOR_PRICEBOOK"] == "default"
    assert env["GPUCLOUD_OPERATOR_STORAGE_SETTLEMENT_S"] == "3600"
    assert env["GPUCLOUD_OPERATOR_REMINDER_LEAD_S"] == "604800"
    # autoscaling reads the gateways' request volume on their ops Service
    stats = env["GPUCLOUD_OPERATOR_MODEL_STATS_URL"]
    assert stats == "http://gpucloud-gateway-ops.gpucloud-system.svc:9091/v1/stats"
    ops = find(defaults, "Service", "-gateway-ops")
    assert ops["spec"]["ports"] == [{"name": "ops", "port": 9091, "targetPort": "ops"}]


def test_sqlite_pins_ledger_users_to_the_operator_node(defaults: list[dict[str, Any]]) -> None:
    for name in ("-api", "-gateway"):
        pod = find(defaults, "Deployment", name)["spec"]["template"]["spec"]
        (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
        assert {"name": "ledger", "persistentVolumeClaim": {"claimName": "gpucloud-ledger"}} in pod[
            "volumes"
        ]


def test_postgresql_with_replicas(tmp_path: Path) -> None:
    docs = render(
        tmp_path,
        "--set",
        "database.type=postgresql",
        "--set",
        "database.url=postgresql+psycopg://gc:pw@db:5432/gpucloud",
        "--set",
        "api.replicas=3",
    )
    api = find(docs, "Deployment", "-api")
    assert api["spec"]["replicas"] == 3
    assert "affinity" not in api["spec"]["template"]["spec"]
    ref = env_of(containers(api)[0])["GPUCLOUD_DATABASE_URL"]
    assert ref == {"secretKeyRef": {"name": "gpucloud-database", "key": "url"}}
    secret = find(docs, "Secret", "-database")
    assert secret["stringData"]["url"] == "postgresql+psycopg://gc:pw@db:5432/gpucloud"
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    docs = render(
        tmp_path,
        "--set",
        "database.type=postgresql",
        "--set",
        "database.existingSecret=pg",
        "--set",
        "api.replicas=2",
    )
    ref = env_of(containers(find(docs, "Deployment", "-operator"))[0])["GPUCLOUD_LEDGER_URL"]
    assert ref == {"secretKeyRef": {"name": "pg", "key": "url"}}


def test_monitoring_objects(tmp_path: Path) -> None:
    docs = render(
        tmp_path,
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.prometheusRule.enabled=true",
    )
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"gpucloud-agent", "gpucloud-operator"}
    # The API's and gateway's metrics: scraped on the pods' ops port, which their
    # Services do not publish (issue 16, finding 8).
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert set(pods) == {"gpucloud-api", "gpucloud-gateway"}
    for name, monitor in pods.items():
        c = find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "ops"
        assert "ops" in {p["name"] for p in c["ports"]}
        assert {p["name"] for p in find(docs, "Service", name)["spec"]["ports"]} == {"http"}
    assert monitors["gpucloud-agent"]["spec"]["endpoints"][0]["honorLabels"] is True
    # Each ServiceMonitor names a port its component's Service really has.
    for name, monitor in monitors.items():
        ports = {p["name"] for p in find(docs, "Service", name)["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in ports, name
    dash = find(docs, "ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "gpucloud-overview.json" in dash["data"]


def test_gateway_config_is_accepted_by_the_gateway(tmp_path: Path) -> None:
    from gpucloud_gateway.main import build

    docs = render(tmp_path, "--set", "gateway.modelsFromCluster=false")
    config = yaml.safe_load(find(docs, "ConfigMap", "-gateway")["data"]["gateway.yaml"])
    assert "ledger" not in config["billing"]  # from GPUCLOUD_LEDGER_URL, a Secret with PG
    # Local stand-ins for what only exists in a cluster; the rest is the rendered file.
    pricebook = find(docs, "ConfigMap", "-pricebook")["data"]["pricebook.yaml"]
    (tmp_path / "pricebook.yaml").write_text(pricebook)
    config["billing"] = {"store": "usage.db", "pricebook": "pricebook.yaml"}
    config["endpoints"] = {"kind": "static", "map": {}}
    config["scaler"] = {"kind": "none"}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    runtime = build(tmp_path / "gateway.yaml")
    assert (
        runtime.outbox is not None
        and runtime.poster is not None
        and not runtime.models_from_cluster
    )
    defaults = render(tmp_path)
    config = yaml.safe_load(find(defaults, "ConfigMap", "-gateway")["data"]["gateway.yaml"])
    assert config["models"] == {"kind": "kubernetes"}
    assert config["endpoints"] == {"kind": "kubernetes"} and config["scaler"] == config["endpoints"]
    # callers authenticate with TokenReview; one replica counts alone, several sum peers
    assert config["auth"] == {"kind": "tokenreview", "audiences": [], "cacheSeconds": 5}
    assert "stats" not in config
    two = render(tmp_path, "--set", "gateway.replicas=2", "--set", "gateway.billing.enabled=false")
    config = yaml.safe_load(find(two, "ConfigMap", "-gateway")["data"]["gateway.yaml"])
    service = find(two, "Service", "-gateway")["metadata"]["name"]
    assert config["stats"]["peers"] == {
        "kind": "kubernetes",
        "service": service,
        "port": 9091,
    }  # replicas' ops port


# (values, words the error must contain): the field and the rule.
BAD_VALUES = [
    (["--set", "api.replicas=3"], ["api.replicas", "postgresql", "single"]),
    (["--set-string", "api.replicas=three"], ["/api/replicas", "integer"]),
    (["--set", "api.replicas=0"], ["/api/replicas", "minimum"]),
    (["--set", "database.type=mysql"], ["/database/type", "sqlite", "postgresql"]),
    (["--set", "database.type=postgresql"], ["database.url or database.existingSecret"]),
    (["--set", "database.type=postgresql", "--set", "database.url=mysql://x"], ["/database/url"]),
    (["--set", "pricebook.gpus[0].payAsYouGoPerHour=9.8.0"], ["payAsYouGoPerHour"]),
    (["--set", "pricebook.gpus[0].spotPerHour=-1"], ["spotPerHour"]),
    (["--set", "currency=yuan"], ["/currency"]),
    (["--set", "operator.config.tick_intervl_s=5"], ["/operator/config", "tick_intervl_s"]),
    (["--set", "operator.replicas=2"], ["/operator/replicas"]),
    (["--set", "agent.nvml=mock"], ["/agent/nvml"]),
    (["--set", "apii.replicas=1"], ["apii"]),
    (["--set", "cloudDisks.storage=ceph"], ["/cloudDisks/storage"]),
    (["--set", "cloudDisks.storage=nfs"], ["cloudDisks.nfs.server"]),
    (
        ["--set", "cloudDisks.storage=hostPath", "--set", "operator.config.disk_meter_node=x"],
        ["operator.config.disk_meter_node", "set by cloudDisks"],
    ),
]


@pytest.mark.parametrize(("args", "words"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_fail_naming_the_field(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    proc = helm("template", "gpucloud", str(CHART), *args, tmp=tmp_path)
    assert proc.returncode != 0, f"{args} rendered"
    for word in words:
        assert word in proc.stderr, f"{word!r} not in: {proc.stderr}"


def test_cloud_disks_on_shared_storage_are_metered_once(tmp_path: Path) -> None:
    """cloudDisks.storage set: one shared-storage meter (the agent image, no GPUs, disks
    only, its WAL on the shared storage), the API maps its account to the reporter name,
    the operator binds disk meters to it and mounts the root; node agents skip disks/."""
    assert not [d for d in render(tmp_path) if d["metadata"]["name"].endswith("storage-meter")]
    docs = render(
        tmp_path, "--set", "cloudDisks.storage=nfs", "--set", "cloudDisks.nfs.server=nas",
        "--set", "cloudDisks.nfs.path=/export",
    )  # fmt: skip
    meter = find(docs, "Deployment", "-storage-meter")
    assert meter["spec"]["replicas"] == 1 and meter["spec"]["strategy"]["type"] == "Recreate"
    (c,) = containers(meter)
    env = env_of(c)
    assert (env["GPUCLOUD_AGENT_NODE_NAME"], env["GPUCLOUD_AGENT_NVML"]) == (
        "gpucloud-shared-storage",
        "none",
    )
    assert env["GPUCLOUD_AGENT_DISK_KINDS"] == "disks"
    assert env["GPUCLOUD_AGENT_WAL_DIR"].startswith("/var/lib/gpucloud/disks/.")
    volumes = {v["name"]: v for v in meter["spec"]["template"]["spec"]["volumes"]}
    assert volumes["disks"]["nfs"] == {"server": "nas", "path": "/export/disks"}
    api = env_of(containers(find(docs, "Deployment", "-api"))[0])
    assert api["GPUCLOUD_SA_NODE_MAP"] == (
        "system:serviceaccount:gpucloud-system:gpucloud-storage-meter=gpucloud-shared-storage"
    )
    op = containers(find(docs, "Deployment", "-operator"))[0]
    assert env_of(op)["GPUCLOUD_OPERATOR_DISK_METER_NODE"] == "gpucloud-shared-storage"
    assert env_of(op)["GPUCLOUD_OPERATOR_DISK_NFS_SERVER"] == "nas"
    assert {"name": "disks", "mountPath": "/var/lib/gpucloud/disks"} in op["volumeMounts"]
    agent = env_of(containers(find(docs, "DaemonSet", "-agent"))[0])
    assert agent["GPUCLOUD_AGENT_DISK_KINDS"] == "instances,images"
    find(docs, "ServiceAccount", "-storage-meter")


def test_large_numbers_stay_integers(tmp_path: Path) -> None:
    """Helm reads YAML numbers as floats; 30 days must not reach the operator as 2.592e+06."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "operator:\n  config:\n    package_month_s: 2592000\n    tick_interval_s: 0.5\n"
    )
    docs = render(tmp_path, "-f", str(values))
    env = env_of(containers(find(docs, "Deployment", "-operator"))[0])
    assert env["GPUCLOUD_OPERATOR_PACKAGE_MONTH_S"] == "2592000"
    assert env["GPUCLOUD_OPERATOR_TICK_INTERVAL_S"] == "0.5"


def test_helm_installs_all_crds_including_kopf(tmp_path: Path) -> None:
    docs = render(tmp_path, "--include-crds")
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    repo = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (REPO / "crds").glob("*")}
    assert crds == repo | {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_without_gateway(tmp_path: Path) -> None:
    docs = render(tmp_path, "--set", "gateway.enabled=false")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-gateway")]


def test_every_operator_setting_is_a_value() -> None:
    """install.md promises every OperatorConfig setting under operator.config; the schema
    stays strict (additionalProperties: false), so each must be listed there."""
    from gpucloud_operator.config import OperatorConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    listed = set(schema["properties"]["operator"]["properties"]["config"]["properties"])
    # set by the chart from other values: the database, the price book, the metrics port
    chart_owned = {"ledger_url", "pricebook", "metrics_port", "finalizer"}
    assert listed == set(OperatorConfig.model_fields) - chart_owned


def test_optional_objects_for_production(tmp_path: Path) -> None:
    """Ingress, PodDisruptionBudgets, NetworkPolicies, one tag for every image, workload
    identity annotations and a tightened securityContext, as install.md documents them."""
    docs = render(
        tmp_path,
        "--set", "database.type=postgresql", "--set", "database.existingSecret=db",
        "--set", "api.replicas=2", "--set", "gateway.replicas=2",
        "--set", "api.ingress.enabled=true", "--set", "api.ingress.className=nginx",
        "--set", "api.ingress.hosts[0]=billing.example.com",
        "--set", "networkPolicy.enabled=true",
        "--set", "global.imageRegistry=registry.example.com/team",
        "--set", "global.imageTag=0.1.0-abc", "--set", "agent.image.tag=0.1.1",
        "--set", "operator.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=op@x",
        "--set", "api.securityContext.runAsUser=2000",
    )  # fmt: skip
    ingress = find(docs, "Ingress", "-api")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "billing.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == "gpucloud-api"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        "gpucloud-api",
        "gpucloud-gateway",
    }
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {f"gpucloud-{c}" for c in ("api", "gateway", "operator", "agent")}
    assert policies["gpucloud-operator"]["spec"]["ingress"] is None  # nothing may connect
    # model callers reach the proxy port only; /v1/stats and /metrics are the release's
    callers = policies["gpucloud-gateway"]["spec"]["ingress"][1]
    assert callers == {"from": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {
        "registry.example.com/team/gpucloud/operator:0.1.0-abc",
        "registry.example.com/team/gpucloud/api:0.1.0-abc",
        "registry.example.com/team/gpucloud/gateway:0.1.0-abc",
        "registry.example.com/team/gpucloud/agent:0.1.1",  # its own tag wins
    }
    sa = find(docs, "ServiceAccount", "-operator")
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "op@x"}
    api = find(docs, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsUser": 2000,
    }
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):  # no Service env vars over our own
            assert d["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.e2e
def test_notes_tell_how_to_reach_the_api(testbed: Testbed, tmp_path: Path) -> None:
    """NOTES.txt renders only on install: a client-side dry run against the test bed."""
    ensure_kopf_crds(testbed)
    proc = helm(
        "install", "notes", str(CHART), "--namespace", "notes-dry-run",
        "--dry-run=client", "--set", f"pricebook.name=notes-{uuid.uuid4().hex[:8]}",
        tmp=tmp_path, kubeconfig=testbed.kubeconfig,
    )  # fmt: skip
    # (its own PriceBook name: a cluster-scoped "default" someone applied must not collide)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "http://notes-gpucloud-api.notes-dry-run.svc:8080" in notes
    assert "port-forward svc/notes-gpucloud-api 8080:8080" in notes
    assert "examples/account.yaml" in notes
