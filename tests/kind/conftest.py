"""Fixtures of the kind tier: the cluster (session), a namespace per test, and our chart
installed from our images (``gpucloud_release``, one per session)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kindrelease import RELEASE_NAMESPACE, KindHarness, install_release
from gpucloud.testing.kube import delete_namespace


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.kind)
            # a release install (helm --wait, up to 5 min) can be part of a test's setup
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def kind() -> KindCluster:
    cluster = KindCluster()
    cluster.up()
    return cluster


@pytest.fixture
def kind_namespace(kind: KindCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(
        c if c.isalnum() or c == "-" else "-" for c in f"k-{base}-{uuid.uuid4().hex[:5]}"
    )
    kind.kubectl("create", "namespace", name)
    yield name
    delete_namespace(kind, name)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def gpucloud_release(kind: KindCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chart installed with its defaults (SQLite ledger) and our images."""
    install_release(kind, tmp_path_factory.mktemp("helm"))
    return RELEASE_NAMESPACE


@pytest.fixture
def h(kind: KindCluster, gpucloud_release: str, kind_namespace: str) -> Iterator[KindHarness]:
    """A tenant of the session's release (an Account for the test's namespace), as the
    e2e tests name their harness."""
    harness = KindHarness(kind, kind_namespace, gpucloud_release)
    harness.setup()
    yield harness
    harness.close()
