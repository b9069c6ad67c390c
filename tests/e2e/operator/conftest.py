from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opharness import Harness

from gpucloud.testing.testbed import Testbed
from gpucloud.testing.webhook import Hook, running_hook


@pytest.fixture
def harness(testbed: Testbed, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(testbed, namespace, tmp_path)
    h.setup()
    yield h
    h.close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    with running_hook() as server:
        yield server
