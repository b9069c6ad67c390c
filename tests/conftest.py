"""Shared pytest configuration: fixtures that start real services live in gpucloud.testing."""

pytest_plugins: list[str] = ["gpucloud.testing.kube", "gpucloud.testing.postgres"]


def pytest_collection_modifyitems(items: list) -> None:  # type: ignore[type-arg]
    """The kind tier's tests run last: its cluster's idle load (four kubelets, a control
    plane) is kept away from the timing-sensitive kwok tests before them."""

    def order(item: object) -> tuple[bool, bool]:
        path = str(item.path)  # type: ignore[attr-defined]
        # the chart's lifecycle module uninstalls the session's release: last of all
        return "/tests/kind/" in path, path.endswith("test_kind_lifecycle.py")

    items.sort(key=order)
