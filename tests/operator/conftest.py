from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opworld import NS, World, make_world

__all__ = ["NS"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.ledger.close()
