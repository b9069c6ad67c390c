"""Shared pytest configuration: fixtures that start real services live in gpucloud.testing."""

pytest_plugins: list[str] = ["gpucloud.testing.kube", "gpucloud.testing.postgres"]


def pytest_collection_modifyitems(items: list) -> None:  # type: ignore[type-arg]
    """The kind tier's tests run last: its cluster's idle load (four kubelets, a control
    plane) is kept away from the timing-sensitive kwok tests before them."""
    items.sort(key=lambda item: "/tests/kind/" in str(item.path))
