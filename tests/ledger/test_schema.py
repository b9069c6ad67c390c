"""The migrations create exactly the schema the code declares, and ship in the package."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from ledger_helpers import T0_S, gpu_record
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

import gpucloud.ledger
from gpucloud.ledger import InvalidInput, open_ledger, schema
from gpucloud.ledger.db import MIGRATIONS, SQLITE_BUSY_TIMEOUT_MS, current_revision
from gpucloud.ledger.ingest import digest
from gpucloud.ledger.migrations import HEAD
from gpucloud.testing.postgres import postgres_server
from gpucloud.usage import Activity, UsageRecord


def test_migrated_database_matches_the_declared_schema(ledger_url: str) -> None:
    open_ledger(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, schema.metadata)
    engine.dispose()
    assert diff == []


def test_head_constant_matches_the_scripts(ledger_url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD
    ledger = open_ledger(ledger_url)
    assert current_revision(ledger.engine) == HEAD
    ledger.close()


def test_migrations_live_inside_the_package() -> None:
    package = Path(gpucloud.ledger.__file__).parent
    assert package / "migrations" == MIGRATIONS
    assert (MIGRATIONS / "env.py").is_file() and (MIGRATIONS / "script.py.mako").is_file()
    assert list((MIGRATIONS / "versions").glob("0001_*.py"))


def test_digest_covers_every_field_of_a_usage_record() -> None:
    # digest() lists the fields by hand for speed: a new field must be added there too,
    # unless it is not billing content (activity: idle detection, kept beside the record;
    # a re-send with other activity is the same usage, the first one's activity stays).
    assert set(UsageRecord.model_fields) - {"activity"} == {
        "kind",
        "node",
        "start",
        "end",
        "quantity",
        "gpu",
        "pod",
        "volume",
    }
    base = gpu_record(T0_S)
    variants = [
        base.model_copy(update={"node": "node-2"}),
        gpu_record(T0_S, pod_uid="other"),
        gpu_record(T0_S, namespace="other"),
        gpu_record(T0_S, gpu="GPU-other"),
    ]
    assert len({digest(r) for r in [base, *variants]}) == 5
    busy = Activity(util_max_percent=97, memory_max_bytes=2**30, samples=10)
    assert digest(base.model_copy(update={"activity": busy})) == digest(base)


def test_bad_urls_are_refused_clearly(tmp_path: Path) -> None:
    for url, message in [
        ("sqlite://", "needs a file"),
        ("mysql://x/y", "unsupported database 'mysql'"),
        ("not a url", "not a database URL"),
    ]:
        try:
            open_ledger(url)
        except InvalidInput as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{url} was accepted")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'l.db'}")
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
    ledger.close()


def test_commits_are_durable_on_power_loss(ledger_url: str) -> None:
    """SQLite fsyncs the WAL at every commit (synchronous=FULL = 2; NORMAL = 1 loses the
    last commits on power loss); PostgreSQL sessions commit synchronously even where the
    server's default is off (as on the test server)."""
    ledger = open_ledger(ledger_url)
    with ledger.engine.connect() as conn:
        if ledger.dialect == "sqlite":
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        else:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    ledger.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_helper_starts_and_removes_a_server(postgres_url: str) -> None:
    with postgres_server("other") as url:
        assert url.startswith("postgresql+psycopg://") and url.endswith("/other")
        ledger = open_ledger(url)
        ledger.ensure_account("x")
        ledger.close()
        port = make_url(url).port
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
