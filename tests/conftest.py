"""Shared pytest configuration: fixtures that start real services live in gpucloud.testing."""

pytest_plugins: list[str] = ["gpucloud.testing.kube", "gpucloud.testing.postgres"]
