"""A real, throwaway PostgreSQL server from Debian's package, for tests and benchmarks.

``with postgres_server() as url: ...`` runs initdb in a fresh temporary directory, starts
the server on 127.0.0.1 with a free port (fsync off: this data is disposable), creates
a database and yields a ``postgresql+psycopg://`` URL; on exit it stops the server and
removes the directory. As root, the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root). ``postgres_url`` is the session-scoped pytest fixture.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries are installed."""


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl (or $PG_BINDIR)."""
    env = os.environ.get("PG_BINDIR")
    candidates = (
        [env]
        if env
        else sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name),
            reverse=True,
        )
    )
    for cand in candidates:
        if cand and (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin; "
        "install them with: apt-get install -y postgresql"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_user(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr or proc.stdout}")


@contextmanager
def postgres_server(database: str = "gpucloud", durable: bool = False) -> Iterator[str]:
    """Start a throwaway server; yield its SQLAlchemy URL; stop and delete it on exit.
    ``durable``: fsync on (as in production; benchmarks), else off (tests: faster)."""
    bindir = find_bindir()
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="gpucloud-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user:
        pw = pwd.getpwnam(user)
        for path in (root, sock):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    db_user = "gpucloud"
    port = _free_port()
    started = False
    try:
        _run(
            [
                *_as_user(user),
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                db_user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            "initdb",
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c max_connections=200"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        _run(
            [
                *_as_user(user),
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            "pg_ctl start",
        )
        started = True
        _wait_ready(port)
        _run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", db_user, database],
            "createdb",
        )
        yield f"postgresql+psycopg://{db_user}@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run(
                [
                    *_as_user(user),
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not listen on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def create_database(url: str, name: str) -> str:
    """Create another database on the server behind ``url``; return its URL (tests use
    one database per test for isolation)."""
    import psycopg

    base = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name


try:  # the fixture, when pytest is around (scripts import this module without it)
    import pytest

    @pytest.fixture(scope="session")
    def postgres_url() -> Iterator[str]:
        """A URL of a throwaway PostgreSQL server, shared by the test session."""
        try:
            find_bindir()
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
        with postgres_server() as url:
            yield url

except ImportError:  # pragma: no cover
    pass
