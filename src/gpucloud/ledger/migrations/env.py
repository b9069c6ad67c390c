"""Alembic environment: always run programmatically by ``open_ledger`` (or the alembic CLI
with ``-x url=...``), on the connection it is handed in ``config.attributes``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from gpucloud.ledger.schema import metadata

# An arbitrary constant: concurrent openers of one PostgreSQL database migrate in turn.
_MIGRATION_LOCK = 0x6770_7563_6C64_0001


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the alembic command line
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    with create_engine(url).connect() as conn:
        _run(conn)
