"""Fixtures for the API tests: an in-process app (TestClient) on a real SQLite file."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from apihelpers import T0, TOKENS
from fastapi.testclient import TestClient

from gpucloud.api import Settings
from gpucloud.api.app import create_app
from gpucloud.api.auth import AuthPolicy, StaticTokenAuthenticator
from gpucloud.api.testserver import SANDBOX_SECRET
from gpucloud.clock import ManualClock
from gpucloud.ledger import Ledger, open_ledger
from gpucloud.recharge import ProviderRegistry, SandboxProvider
from gpucloud.testing.postgres import create_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger database: a real SQLite file, or a new database on the session's
    throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server = request.getfixturevalue("postgres_url")
    return create_database(server, f"api_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def sandbox() -> SandboxProvider:
    return SandboxProvider(SANDBOX_SECRET.encode())


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    """A second handle on the API's database, for arranging meters and checking totals."""
    lg = open_ledger(db_url)
    yield lg
    lg.close()


@pytest.fixture
def client(
    db_url: str, clock: ManualClock, sandbox: SandboxProvider, tmp_path: Path, ledger: Ledger
) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url,
        authenticator=StaticTokenAuthenticator(TOKENS),
        policy=AuthPolicy(),
        clock=clock,
        providers=ProviderRegistry([sandbox]),
        order_ttl_s=600,
        rating_interval_s=0.2,
        voucher_dir=tmp_path / "vouchers",
    )
    with TestClient(create_app(settings)) as c:
        yield c
