"""Engines and migrations: the only place that knows SQLite from PostgreSQL at setup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

from gpucloud.ledger.errors import InvalidInput
from gpucloud.ledger.migrations import HEAD

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 60_000
READ_ONLY = "gpucloud_ledger_read_only"  # execution option: a read-only transaction


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...``."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidInput(f"url: {url!r} is not a database URL ({exc})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise InvalidInput("url: the SQLite ledger needs a file (sqlite:///path/to/ledger.db)")
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=8
        )
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        # A commit is durable once acknowledged, whatever the server's default: a payment
        # answered 200 must survive a power loss (synchronous_commit=off may lose it).
        return create_engine(
            parsed,
            pool_size=8,
            max_overflow=8,
            pool_pre_ping=True,
            connect_args={"options": "-c synchronous_commit=on"},
        )
    raise InvalidInput(f"url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL: each commit fsyncs the WAL, so a payment answered 200 survives a power
        # loss (NORMAL survives a process crash only; the cost is in docs/benchmarks.md).
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front: read-then-write transactions (balance
        # checks, idempotency look-ups) never see a snapshot another writer has moved
        # past. Read-only transactions take a WAL snapshot without blocking anyone.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision, read without importing Alembic (process start-up
    stays fast for short-lived workers)."""
    # Read-only: on SQLite a writer's BEGIN IMMEDIATE would queue a starting process
    # (a gateway restarted after a kill) behind whoever holds the write lock.
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Run the Alembic migrations to head on this engine (a no-op when already there)."""
    if current_revision(engine) == HEAD:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
