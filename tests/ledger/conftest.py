"""One ledger suite, parametrised over both databases: a fresh SQLite file and a fresh
database on a real throwaway PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_helpers import T0
from sqlalchemy import create_engine, text

from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger, open_ledger, schema
from gpucloud.testing.postgres import create_database


@pytest.fixture(scope="session")
def pg_ledger_url(postgres_url: str) -> str:
    """One migrated database for the session; each test starts from empty tables."""
    url = create_database(postgres_url, "ledger_tests")
    open_ledger(url).close()
    return url


def _truncate(url: str) -> None:
    tables = ", ".join(t.name for t in schema.metadata.sorted_tables)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty, migrated ledger database: a new SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("pg_ledger_url")
    _truncate(url)
    return url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def ledger(ledger_url: str, clock: ManualClock) -> Iterator[Ledger]:
    lg = open_ledger(ledger_url, clock=clock)
    yield lg
    lg.close()
