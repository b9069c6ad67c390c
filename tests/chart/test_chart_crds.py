"""The chart's CRDs are the repository's, byte for byte, plus Kopf's peering CRDs."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import yaml
from charttools import CHART

from gpucloud.testing.testbed import REPO


def sync_module() -> ModuleType:
    path = REPO / "hack" / "sync_chart_crds.py"
    spec = importlib.util.spec_from_file_location("sync_chart_crds", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sync_chart_crds", module)
    spec.loader.exec_module(module)
    return module


def test_chart_crds_identical_to_repo_crds() -> None:
    problems = sync_module().drift()
    assert problems == [], "chart CRDs drifted; run: python hack/sync_chart_crds.py\n" + "\n".join(
        problems
    )
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "crds").glob("*.yaml")
    )


def test_drift_is_detected_and_repaired(tmp_path: Path) -> None:
    sync = sync_module()
    src, dst = tmp_path / "crds", tmp_path / "chart-crds"
    shutil.copytree(REPO / "crds", src)
    (dst / "kopf").mkdir(parents=True)
    (dst / "kopf" / "peering.yaml").write_text("kind: keep-me\n")
    (dst / "gone.yaml").write_text("kind: stale\n")
    first = sorted(p.name for p in src.glob("*.yaml"))[0]
    assert f"missing in chart: {first}" in sync.drift(src, dst)
    sync.sync(src, dst)
    assert sync.drift(src, dst) == []
    assert not (dst / "gone.yaml").exists()
    assert (dst / "kopf" / "peering.yaml").read_text() == "kind: keep-me\n"  # chart-owned
    # One changed byte (a trailing space) is drift.
    (dst / first).write_bytes((src / first).read_bytes() + b" ")
    assert sync.drift(src, dst) == [f"differs: {first}"]
    assert sync.main(["--check"]) == 0  # the real chart is in sync


def test_kopf_peering_crds() -> None:
    docs = list(
        yaml.safe_load_all((CHART / "crds" / "kopf" / "kopf.dev_peerings.yaml").read_text())
    )
    by_name = {d["metadata"]["name"]: d for d in docs}
    assert set(by_name) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    cluster = by_name["clusterkopfpeerings.kopf.dev"]["spec"]
    assert cluster["scope"] == "Cluster" and cluster["names"]["kind"] == "ClusterKopfPeering"
    assert by_name["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for doc in docs:
        (version,) = doc["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True
