"""The two :class:`~.database.Database` backends and :func:`open_store_database`, which picks one.

:class:`SqliteDatabase`: a file owned by one server (its lock file refuses a
second). :class:`PostgresDatabase`: a pool of ``psycopg`` connections to a
database that several servers may share.

>>> db = open_store_database(":memory:")
>>> type(db).__name__, db.shared
('SqliteDatabase', False)
>>> db.close()
"""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from inversion_monitor.server.database import (
    POOL_TIMEOUT_S,
    POSTGRESQL,
    SQLITE,
    Connection,
    Database,
    PostgresConnection,
    PostgresUrl,
    SqliteConnection,
    is_postgres_url,
    parse_postgres_url,
)
from inversion_monitor.server.schema import connect, migrate, open_database
from inversion_monitor.server.store_errors import StoreError, store_error

if TYPE_CHECKING:  # pragma: no cover
    from psycopg_pool import ConnectionPool

# pooled connections per server: the writer, the reader and room for a reconnect
POOL_MIN = 2
POOL_MAX = 6


class SqliteDatabase(Database):
    """A SQLite file (or ``:memory:``) owned by this server: see :func:`~.schema.open_database`.

    >>> db = SqliteDatabase(":memory:")
    >>> db.writer.query_one("SELECT count(*) FROM runs")
    (0,)
    >>> db.close()
    """

    dialect = SQLITE
    shared = False

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.description = path
        self._busy_timeout_ms = busy_timeout_ms
        conn, self._lock = open_database(path, busy_timeout_ms)
        self._writer = SqliteConnection(conn)
        self._closed = False

    @property
    def writer(self) -> SqliteConnection:
        return self._writer

    def reader(self) -> Connection:
        if self.path == ":memory:":
            raise StoreError(":memory: has one connection: read on the writer's")
        try:
            return SqliteConnection(connect(self.path, self._busy_timeout_ms))
        except sqlite3.Error as exc:
            raise store_error(exc, f"cannot open database {self.path}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        if self._lock is not None:
            self._lock.close()


class PostgresDatabase(Database):
    """A PostgreSQL database through a ``psycopg_pool`` pool; several servers may share it.

    Opening it waits (at most ``timeout_s``) for a first connection, then brings the
    schema to :data:`~.schema.SCHEMA_VERSION` under an advisory lock.
    """

    dialect = POSTGRESQL
    shared = True

    def __init__(self, url: PostgresUrl, timeout_s: float = 10.0) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError:
            raise StoreError(
                f"--db {url} needs the PostgreSQL driver: pip install 'inversion-monitor[postgres]'"
            ) from None
        self.url = url
        self.description = str(url)
        self._lock = threading.Lock()
        self._closed = False
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url.conninfo,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            kwargs={"autocommit": True, "application_name": "inversion-monitor"},
            timeout=POOL_TIMEOUT_S,
            name="inversion-monitor",
            open=False,
        )
        # one direct attempt first: a wrong password or host fails at once, with libpq's reason
        try:
            psycopg.connect(url.conninfo, connect_timeout=max(1, int(timeout_s))).close()
        except psycopg.Error as exc:
            lines = str(exc).strip().splitlines()
            reason = url.scrub(" ".join(line.strip() for line in lines) or type(exc).__name__)
            raise StoreError(f"cannot connect to database {url}: {reason}") from None
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout:
            self._pool.close()
            raise StoreError(
                f"cannot connect to database {url}: no connection within {timeout_s:.0f} s"
            ) from None
        self._writer = PostgresConnection(self._pool, url)
        try:
            migrate(self._writer, str(url))
        except BaseException:
            self._pool.close()
            raise

    @property
    def writer(self) -> PostgresConnection:
        return self._writer

    def reader(self) -> Connection:
        return PostgresConnection(self._pool, self.url)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()


def open_store_database(target: object, busy_timeout_ms: int = 5000) -> Database:
    """The :class:`Database` that ``--db`` names: a ``postgresql://`` URL or a SQLite path."""
    if isinstance(target, Database):
        return target
    if isinstance(target, PostgresUrl):
        return PostgresDatabase(target)
    text = str(target)
    if is_postgres_url(text):
        try:
            url = parse_postgres_url(text)
        except ValueError as exc:
            raise StoreError(f"invalid --db: {exc}") from None
        return PostgresDatabase(url)
    return SqliteDatabase(text, busy_timeout_ms)
