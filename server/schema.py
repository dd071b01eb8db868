"""The schema and its migrations (both backends), opening a SQLite file safely, the store's errors.

:func:`migrate` brings a database of either backend to :data:`SCHEMA_VERSION`
in one transaction, adding columns and tables and never dropping any (the
types come from the connection's :class:`~.database.Dialect`).
:func:`open_database` takes a SQLite file's exclusive lock (``<db>.lock``),
refuses a file whose write-ahead log went missing after an unclean stop or that
fails ``PRAGMA quick_check``, and migrates it. The queries live in :mod:`.store`.

>>> conn, lock = open_database(":memory:")
>>> conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION, lock
(True, None)
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path
from typing import IO

from inversion_monitor.server.database import Connection, SqliteConnection
from inversion_monitor.server.store_errors import (
    DatabaseInUse,
    DiskFull,
    StoreError,
    is_disk_full,
    store_error,
)

__all__ = [
    "SCHEMA_VERSION",
    "DatabaseInUse",
    "DiskFull",
    "StoreError",
    "connect",
    "migrate",
    "open_database",
    "store_error",
]

log = logging.getLogger("inversion_monitor.server")

SCHEMA_VERSION = 3
# same length, so marking overwrites the file's bytes in place (no allocation on a full disk)
_CLEAN = "clean  "
_RUNNING = "running"

# portable SQL; {integer}, {real}, {blob}, ... are the dialect's types (Dialect.ddl)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    pk {serial_key},
    run_id TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL UNIQUE,
    project TEXT NOT NULL,
    info {blob} NOT NULL,
    world_size {integer} NOT NULL,
    opened_time {real} NOT NULL,
    last_update_time {real},
    last_activity_time {real} NOT NULL,
    status TEXT NOT NULL,
    records {integer} NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT ''
);
-- ListRuns' older runs and the replicas' read-back of runs changed elsewhere
CREATE INDEX IF NOT EXISTS runs_by_activity ON runs (last_activity_time);
CREATE TABLE IF NOT EXISTS ranks (
    run_pk {integer} NOT NULL REFERENCES runs(pk),
    rank {integer} NOT NULL,
    acked_sequence {integer} NOT NULL,
    status TEXT NOT NULL,
    -- sha256 hex of the current writer session, the one it replaced, and the
    -- Unix time of the session's last OpenRun or Push
    session TEXT,
    previous_session TEXT,
    session_time {real} NOT NULL DEFAULT 0,
    PRIMARY KEY (run_pk, rank)
){without_rowid};
CREATE TABLE IF NOT EXISTS records (
    run_pk {integer} NOT NULL,
    rank {integer} NOT NULL,
    sequence {integer} NOT NULL,
    step {integer} NOT NULL,
    wall_time {real} NOT NULL,
    received_time {real} NOT NULL,
    spearman {real},
    pearson {real},
    entropy_mean {real},
    score_mean {real},
    payload {blob} NOT NULL,
    UNIQUE (run_pk, rank, sequence)
);
CREATE INDEX IF NOT EXISTS records_by_step ON records (run_pk, step);
CREATE TABLE IF NOT EXISTS rejected (
    run_pk {integer} NOT NULL,
    rank {integer} NOT NULL,
    sequence {integer} NOT NULL,
    field TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_time {real} NOT NULL,
    PRIMARY KEY (run_pk, rank, sequence)
){without_rowid};
CREATE TABLE IF NOT EXISTS alerts (
    id {serial_key},
    run_id TEXT NOT NULL,
    display_name TEXT NOT NULL,
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    active {integer} NOT NULL,
    start_step {integer} NOT NULL,
    end_step {integer},
    start_time {real} NOT NULL,
    end_time {real},
    reason TEXT NOT NULL,
    summary TEXT NOT NULL,
    description TEXT NOT NULL,
    trigger_values TEXT NOT NULL,
    end_reason TEXT,
    end_values TEXT
);
CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run_id, id);
CREATE INDEX IF NOT EXISTS alerts_active ON alerts (run_id, name) WHERE active = 1;
CREATE TABLE IF NOT EXISTS probe (x {blob});
"""

# schema version 1 -> 2: writer sessions on the ranks table
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE ranks ADD COLUMN session TEXT",
        "ALTER TABLE ranks ADD COLUMN previous_session TEXT",
        "ALTER TABLE ranks ADD COLUMN session_time {real} NOT NULL DEFAULT 0",
    ),
    # the run kind ("sft", "rl", "custom"; "" = unknown)
    3: ("ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT ''",),
}


def connect(path: Path | str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL journaling."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if str(path) != ":memory:":
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"could not switch {path} to WAL mode (got {mode!r})")
    # durable across a crash of the server; an OS crash may lose the last commits
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class FileLock:
    """``<db>.lock``: an exclusive ``flock`` for the server's lifetime, and a clean-stop marker.

    The file holds ``running`` while a server has the database open and
    ``clean`` after it closed it properly, so the next start knows whether the
    previous one stopped uncleanly.
    """

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._file: IO[str] | None = os.fdopen(fd, "r+", encoding="utf-8")
        except OSError as exc:
            raise store_error(exc, f"cannot open database {db}") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            self._file = None
            raise DatabaseInUse(
                f"database {db} is in use by another inversion-monitor server (it holds "
                f"{self.path}): stop that server, or give this one another --db"
            ) from None
        self._file.seek(0)
        self.previous_state = self._file.read().strip()

    def mark(self, state: str) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.write(state + "\n")
            self._file.truncate()
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            log.warning("could not mark %s as %s: %s", self.path, state.strip(), exc)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def close(self) -> None:
        """Mark the stop clean and release the lock (after the connection closed)."""
        self.mark(_CLEAN)
        self.release()


def open_database(
    path: Path | str, busy_timeout_ms: int = 5000
) -> tuple[sqlite3.Connection, FileLock | None]:
    """The writer's connection to ``path`` at :data:`SCHEMA_VERSION`, and the file's lock.

    The lock is None for ``:memory:``; call its :meth:`FileLock.close` after
    closing the connection so the next start knows the stop was clean.
    """
    path = str(path)
    lock: FileLock | None = None
    if path != ":memory:":
        db = Path(path)
        lock = FileLock(db)
        try:
            _check_wal(db, lock.previous_state)
        except BaseException:
            lock.release()
            raise
    try:
        conn = connect(path, busy_timeout_ms)
        _check_integrity(conn, path)
        migrate(SqliteConnection(conn), path)
    except BaseException as exc:
        if lock is not None:
            lock.release()
        if isinstance(exc, sqlite3.Error):
            raise _open_error(path, exc) from exc
        raise
    if lock is not None:
        lock.mark(_RUNNING)
    return conn, lock


def _open_error(path: str, exc: sqlite3.Error) -> StoreError:
    if is_disk_full(exc):
        return DiskFull(f"cannot open database {path}: the disk is full ({exc})")
    if "malformed" in str(exc) or "not a database" in str(exc):
        return StoreError(_damaged(path, str(exc)))
    return StoreError(f"cannot open database {path}: {exc}")


def _check_wal(db: Path, previous_state: str) -> None:
    wal = db.with_name(db.name + "-wal")
    if previous_state == _RUNNING.strip() and db.exists() and not wal.exists():
        raise StoreError(
            f"database {db} was not closed cleanly and its write-ahead log {wal} is "
            "missing, so acknowledged records may be lost: put the -wal file back "
            f"(from where it went or a backup) and start again, or delete {db}.lock to "
            "accept the loss and serve what the database holds"
        )


def _check_integrity(conn: sqlite3.Connection, path: str) -> None:
    if path == ":memory:":
        return
    rows = conn.execute("PRAGMA quick_check").fetchall()
    problems = [str(row[0]) for row in rows if str(row[0]) != "ok"]
    if problems:
        raise StoreError(_damaged(path, "; ".join(problems[:3])))


def migrate(conn: Connection, where: str = "the database") -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` in one transaction; data is never dropped.

    Refuses a database a newer server migrated. Several servers starting together on
    one PostgreSQL database migrate one after the other (an advisory lock).
    """
    dialect = conn.dialect
    with conn.transaction():
        for statement in dialect.migration_lock:
            conn.execute(statement)
        row = conn.query_one(dialect.read_version)
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{where} has schema version {version}; this server knows up to "
                f"{SCHEMA_VERSION}: upgrade inversion-monitor or use another --db"
            )
        if conn.query_one(dialect.table_exists, ("ranks",)) is not None:
            for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(target, ()):
                    conn.execute(dialect.ddl(statement))
        for statement in dialect.ddl(_SCHEMA).split(";"):
            if statement.strip():
                conn.execute(statement)
        if version != SCHEMA_VERSION:
            for statement in dialect.write_version:
                conn.execute(statement.format(version=SCHEMA_VERSION))


def _damaged(path: str, detail: str) -> str:
    return (
        f"database {path} is damaged ({detail[:200]}): restore it from a backup, or move it "
        "(with its -wal and -shm files) aside to start with an empty database"
    )
