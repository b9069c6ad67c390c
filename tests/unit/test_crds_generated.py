"""crds/ is generated from hack/gen_crds.py and must not drift from it."""

import subprocess
import sys

import yaml

from gpucloud.testing.testbed import REPO


def test_crds_are_generated_from_source() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen_crds.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_crd_has_status_subresource_category_and_printer_columns() -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert "gpucloud" in crd["spec"]["names"]["categories"], path.name
        assert crd["spec"]["names"]["shortNames"], path.name
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}, path.name
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert "Age" in columns and len(columns) >= 3, path.name
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
