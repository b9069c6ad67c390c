"""pytest fixtures for end-to-end tests against the kwok test bed.

`testbed` (session scope) starts or reuses the cluster and installs the CRDs;
`namespace` gives each test its own namespace and deletes it afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import yaml

from gpucloud.testing.testbed import REPO, Testbed

CRDS = REPO / "crds"
# Namespaced kinds that carry Kopf's finalizer (deletion handlers or timers).
FINALIZED_KINDS = ("gpuinstances", "modeldeployments", "recharges", "clouddisks", "images")


def install_crds(tb: Testbed) -> None:
    tb.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(CRDS.glob("*.yaml"))]
    tb.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *[f"crd/{n}" for n in names],
        timeout=70,
    )


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    tb = Testbed()
    tb.up()
    install_crds(tb)
    yield tb


def delete_namespace(tb: Testbed, name: str, timeout_s: int = 90) -> None:
    """Delete a namespace and wait until it is gone (its pods hold GPUs that whatever runs
    next may count on). The operator that served it may be gone already, so our
    finalizers are dropped first: nothing else would ever remove them."""
    tb.kubectl("delete", "namespace", name, "--wait=false", check=False)
    kinds = ",".join(f"{k}.gpucloud.dev" for k in FINALIZED_KINDS)
    for obj in tb.kubectl("get", kinds, "-n", name, "-o", "name", check=False).stdout.split():
        tb.kubectl(
            "patch", obj, "-n", name, "--type=json",
            "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]', check=False,
        )  # fmt: skip
    tb.kubectl(
        "wait", "--for=delete", f"namespace/{name}", f"--timeout={timeout_s}s",
        check=False, timeout=timeout_s + 10,
    )  # fmt: skip


@pytest.fixture
def namespace(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[str]:
    base = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:5]}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    testbed.kubectl("create", "namespace", name)
    yield name
    delete_namespace(testbed, name)


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 30,
    interval: float = 0.2,
    what: str = "condition",
) -> object:
    """Poll until `predicate` returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def get_json(tb: Testbed, *args: str) -> dict:
    return json.loads(tb.kubectl("get", *args, "-o", "json").stdout)
