"""A real throwaway PostgreSQL 15 cluster for the tests, and the database a test stores in.

:class:`PostgresCluster` runs ``initdb`` and ``postgres`` from Debian's
postgresql-15 (``.ci/install-system-deps``) in a temporary directory, as the
unprivileged ``postgres`` user when the tests run as root (``initdb`` refuses
root), on a free port of 127.0.0.1 with its unix socket inside that directory
and fsync off. Local connections are trusted, except for the role
:data:`PASSWORD_ROLE`, which must give its password (so URLs with a password
are tested too). :class:`TestDatabase` is what the parametrised ``database``
fixture gives a test: ``target`` for ``--db`` / ``ServerConfig.db``, and
``rows(sql)`` to read what the server stored, for SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.server_support import free_port, wait_until

BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
PASSWORD_ROLE = "monitor_pw"
PASSWORD = "pa55:w/rd@x"  # characters a URL must percent-encode
PASSWORD_IN_URL = "pa55%3Aw%2Frd%40x"


def _as_postgres() -> list[str]:
    """The prefix that runs a command as the ``postgres`` user (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


class PostgresCluster:
    """One ``postgres`` server on a free port; :meth:`create_database` gives each test its own."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="inversion-monitor-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count()
        if os.geteuid() == 0:
            shutil.chown(self.dir, SUPERUSER, SUPERUSER)
        subprocess.run(
            [
                *_as_postgres(),
                str(BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        hba = self.data / "pg_hba.conf"
        # the password role must authenticate; every other local connection is trusted
        rules = f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(rules + hba.read_text())
        self.start()
        with self.connect() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def start(self) -> None:
        """Start the server and wait (with a deadline) until it accepts connections."""
        log = (self.dir / "postgres.log").open("ab")
        self._proc = subprocess.Popen(
            [
                *_as_postgres(),
                str(BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until("PostgreSQL to accept connections", self._ready, timeout_s=60)

    def _ready(self) -> bool:
        assert self._proc is not None
        assert self._proc.poll() is None, (self.dir / "postgres.log").read_text()[-2000:]
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT: connections are closed, nothing waits for clients)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def close(self) -> None:
        """Stop the server and delete the cluster."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname: str, *, password: bool = False) -> str:
        """``postgresql://`` URL of ``dbname`` (``password``: as :data:`PASSWORD_ROLE`)."""
        user = f"{PASSWORD_ROLE}:{PASSWORD_IN_URL}" if password else SUPERUSER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """A new empty database (owned by :data:`PASSWORD_ROLE`, so both roles may use it)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {PASSWORD_ROLE}")
        return name

    def reset_database(self, name: str) -> None:
        """Empty database ``name`` (its ``public`` schema dropped and made again)."""
        with self.connect(name) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute(f"CREATE SCHEMA public AUTHORIZATION {PASSWORD_ROLE}")


@dataclass
class TestDatabase:
    """Where one test's server stores: a SQLite file or a fresh PostgreSQL database.

    ``target`` is what ``ServerConfig.db`` / ``--db`` takes; :meth:`rows` reads
    back (``?`` placeholders, SQL both engines run).
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    kind: str  # "sqlite" or "postgresql"
    target: Path | str
    cluster: PostgresCluster | None = None
    dbname: str = ""
    _fresh: Iterator[int] = field(default_factory=itertools.count)

    @property
    def postgres(self) -> bool:
        return self.kind == "postgresql"

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, on a connection of its own."""
        if self.cluster is not None:
            with self.cluster.connect(self.dbname) as conn:
                return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params)]
        with contextlib.closing(sqlite3.connect(self.target)) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[object] = ()) -> None:
        """Run one statement in autocommit mode."""
        if self.cluster is not None:
            with self.cluster.connect(self.dbname) as conn:
                conn.execute(sql.replace("?", "%s"), params)
            return
        with contextlib.closing(sqlite3.connect(self.target, isolation_level=None)) as conn:
            conn.execute(sql, params)

    def fresh(self) -> Path | str:
        """An empty database again (a new SQLite file; PostgreSQL: the schema dropped)."""
        if self.cluster is not None:
            self.cluster.reset_database(self.dbname)
            return self.target
        path = Path(self.target)
        self.target = path.with_name(f"fresh-{next(self._fresh)}.db")
        return self.target


def wait_closed(cluster: PostgresCluster, dbname: str, timeout_s: float = 30.0) -> None:
    """Wait until no client holds a connection to ``dbname``."""

    def idle() -> bool:
        with cluster.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()
        return row is not None and row[0] == 0

    wait_until(f"the connections to {dbname} to close", idle, timeout_s)
