"""SQLite persistence (WAL mode): every SQL statement of the server lives here.

Tables: runs, ranks (with the writer session of each (run, rank) stream),
records, rejected sequence numbers and alerts. One :class:`Store` connection
belongs to the single writer thread; readers open their own connection with
:func:`connect` (WAL lets them run while the writer commits). Every record is
written inside the transaction of the push that brought it, and acknowledged
only after that transaction commits.

A :class:`Store` on a file owns it: an exclusive lock (``<db>.lock``) keeps a
second server away, ``PRAGMA quick_check`` refuses a damaged file at start, and
the lock file remembers an unclean stop, so a write-ahead log that went missing
since is noticed instead of silently losing acknowledged records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("inversion_monitor.server")

SCHEMA_VERSION = 3
MAX_ALERTS_PER_RUN = 200
# same length, so marking overwrites the file's bytes in place (no allocation on a full disk)
_CLEAN = "clean  "
_RUNNING = "running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    pk INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL UNIQUE,
    project TEXT NOT NULL,
    info BLOB NOT NULL,
    world_size INTEGER NOT NULL,
    opened_time REAL NOT NULL,
    last_update_time REAL,
    last_activity_time REAL NOT NULL,
    status TEXT NOT NULL,
    records INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS ranks (
    run_pk INTEGER NOT NULL REFERENCES runs(pk),
    rank INTEGER NOT NULL,
    acked_sequence INTEGER NOT NULL,
    status TEXT NOT NULL,
    -- sha256 hex of the current writer session, the one it replaced, and the
    -- Unix time of the session's last OpenRun or Push
    session TEXT,
    previous_session TEXT,
    session_time REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (run_pk, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    run_pk INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    step INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    received_time REAL NOT NULL,
    spearman REAL,
    pearson REAL,
    entropy_mean REAL,
    score_mean REAL,
    payload BLOB NOT NULL,
    UNIQUE (run_pk, rank, sequence)
);
CREATE INDEX IF NOT EXISTS records_by_step ON records (run_pk, step);
CREATE TABLE IF NOT EXISTS rejected (
    run_pk INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    field TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_time REAL NOT NULL,
    PRIMARY KEY (run_pk, rank, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    display_name TEXT NOT NULL,
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    active INTEGER NOT NULL,
    start_step INTEGER NOT NULL,
    end_step INTEGER,
    start_time REAL NOT NULL,
    end_time REAL,
    reason TEXT NOT NULL,
    summary TEXT NOT NULL,
    description TEXT NOT NULL,
    trigger_values TEXT NOT NULL,
    end_reason TEXT,
    end_values TEXT
);
CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run_id, id);
CREATE TABLE IF NOT EXISTS probe (x BLOB);
"""

# schema version 1 -> 2: writer sessions on the ranks table
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE ranks ADD COLUMN session TEXT",
        "ALTER TABLE ranks ADD COLUMN previous_session TEXT",
        "ALTER TABLE ranks ADD COLUMN session_time REAL NOT NULL DEFAULT 0",
    ),
    # the run kind ("sft", "rl", "custom"; "" = unknown)
    3: ("ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT ''",),
}

# (run_pk, rank, sequence, step, wall_time, received_time, spearman, pearson,
#  entropy_mean, score_mean, payload)
RecordRow = tuple[
    int, int, int, int, float, float, float | None, float | None, float | None, float | None, bytes
]
# (run_pk, rank, sequence, field, reason, received_time)
RejectedRow = tuple[int, int, int, str, str, float]


@dataclass(frozen=True)
class StoredRun:
    """A ``runs`` row as loaded at start-up."""

    pk: int
    run_id: str
    display_name: str
    info: bytes
    world_size: int
    opened_time: float
    last_update_time: float | None
    last_activity_time: float
    status: str
    records: int
    # "sft", "rl", "custom" or "" (unknown; runs stored before schema version 3)
    kind: str = ""


@dataclass(frozen=True)
class StoredRank:
    """A ``ranks`` row plus what start-up needs to rebuild its acknowledgement state."""

    run_pk: int
    rank: int
    acked_sequence: int
    status: str
    # sequences persisted or rejected above acked_sequence (out-of-order arrivals)
    pending: frozenset[int]
    latest_sequence: int
    latest_payload: bytes | None
    session: str | None = None
    previous_session: str | None = None
    session_time: float = 0.0


@dataclass(frozen=True)
class StoredAlert:
    """An ``alerts`` row as loaded at start-up (every alert is inactive by then)."""

    run_id: str
    display_name: str
    name: str
    severity: str
    start_step: int
    end_step: int | None
    start_time: float
    end_time: float | None
    summary: str
    description: str
    values: dict[str, float]


class StoreError(RuntimeError):
    """The database refused an operation (disk full, locked, corrupt)."""


class DiskFull(StoreError):
    """The disk holding the database (or its write-ahead log) is full; nothing was written."""


class DatabaseInUse(StoreError):
    """Another server holds the database's lock."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(exc)
        )
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def store_error(exc: BaseException, what: str = "database write failed") -> StoreError:
    """The :class:`StoreError` (a :class:`DiskFull` when it is one) for a failed operation."""
    if isinstance(exc, StoreError):
        return exc
    if _is_disk_full(exc):
        return DiskFull(f"{what}: the disk is full ({exc})")
    return StoreError(f"{what}: {exc}")


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


class _FileLock:
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


class Store:
    """The writer's connection: schema, start-up load and one transaction per push.

    >>> store = Store(":memory:")
    >>> pk = store.insert_run("r1", "demo", "proj", b"", 2, 10.0)
    >>> store.upsert_rank(pk, 0, 0, "running")
    >>> [r.display_name for r in store.load_runs()]
    ['demo']
    >>> store.close()
    """

    def __init__(self, path: Path | str, busy_timeout_ms: int = 5000) -> None:
        self.path = str(path)
        self._lock: _FileLock | None = None
        self._closed = False
        if self.path != ":memory:":
            db = Path(self.path)
            self._lock = _FileLock(db)
            try:
                self._check_wal(db, self._lock.previous_state)
            except BaseException:
                self._lock.release()
                raise
        try:
            self._conn = connect(self.path, busy_timeout_ms)
            self._check_integrity()
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this server knows up to "
                    f"{SCHEMA_VERSION}: upgrade inversion-monitor or use another --db"
                )
            self._migrate(version)
        except BaseException as exc:
            if self._lock is not None:
                self._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise self._open_error(exc) from exc
            raise
        if self._lock is not None:
            self._lock.mark(_RUNNING)

    def _open_error(self, exc: sqlite3.Error) -> StoreError:
        if _is_disk_full(exc):
            return DiskFull(f"cannot open database {self.path}: the disk is full ({exc})")
        if "malformed" in str(exc) or "not a database" in str(exc):
            return StoreError(_damaged(self.path, str(exc)))
        return StoreError(f"cannot open database {self.path}: {exc}")

    def _check_wal(self, db: Path, previous_state: str) -> None:
        wal = db.with_name(db.name + "-wal")
        if previous_state == _RUNNING.strip() and db.exists() and not wal.exists():
            raise StoreError(
                f"database {db} was not closed cleanly and its write-ahead log {wal} is "
                "missing, so acknowledged records may be lost: put the -wal file back "
                f"(from where it went or a backup) and start again, or delete {db}.lock to "
                "accept the loss and serve what the database holds"
            )

    def _check_integrity(self) -> None:
        if self.path == ":memory:":
            return
        rows = self._conn.execute("PRAGMA quick_check").fetchall()
        problems = [str(row[0]) for row in rows if str(row[0]) != "ok"]
        if problems:
            raise StoreError(_damaged(self.path, "; ".join(problems[:3])))

    def _migrate(self, version: int) -> None:
        conn = self._conn
        existing = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ranks'"
        ).fetchone()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if existing:
                for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS.get(target, ()):
                        conn.execute(statement)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @property
    def connection(self) -> sqlite3.Connection:
        """The store's connection, for reads on the writer thread (``:memory:`` has no other)."""
        return self._conn

    def close(self) -> None:
        """Close the connection; the lock file says ``clean`` afterwards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        if self._lock is not None:
            self._lock.mark(_CLEAN)
            self._lock.release()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error.

        An ``sqlite3`` error comes out as :class:`StoreError` (:class:`DiskFull`
        when the disk is full); a rollback that fails (SQLite may already have
        rolled back) never hides the original error.
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise store_error(exc, "database busy or unavailable") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise store_error(exc) from exc
            raise

    def probe_write(self) -> None:
        """A tiny write transaction (raises :class:`DiskFull` while the disk is full)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO probe VALUES (randomblob(64))")
            conn.execute("DELETE FROM probe")

    # ---------------------------------------------------------------- runs

    def insert_run(  # noqa: PLR0917
        self,
        run_id: str,
        display_name: str,
        project: str,
        info: bytes,
        world_size: int,
        now: float,
        kind: str = "",
    ) -> int:
        try:
            cur = self._conn.execute(
                "INSERT INTO runs (run_id, display_name, project, info, world_size, opened_time,"
                " last_activity_time, status, kind) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (run_id, display_name, project, info, world_size, now, now, kind),
            )
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_run(
        self, pk: int, *, world_size: int, last_activity_time: float, status: str
    ) -> None:
        self._execute(
            "UPDATE runs SET world_size = ?, last_activity_time = ?, status = ? WHERE pk = ?",
            (world_size, last_activity_time, status, pk),
        )

    def upsert_rank(  # noqa: PLR0917
        self,
        run_pk: int,
        rank: int,
        acked: int,
        status: str,
        session: str | None = None,
        previous_session: str | None = None,
        session_time: float = 0.0,
    ) -> None:
        self._execute(
            "INSERT INTO ranks (run_pk, rank, acked_sequence, status, session, previous_session,"
            " session_time) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run_pk, rank) DO UPDATE SET acked_sequence = excluded.acked_sequence,"
            " status = excluded.status, session = excluded.session,"
            " previous_session = excluded.previous_session,"
            " session_time = excluded.session_time",
            (run_pk, rank, acked, status, session, previous_session, session_time),
        )

    def _execute(self, sql: str, params: Sequence[object]) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    # ---------------------------------------------------------------- push

    def write_push(
        self,
        records: Sequence[RecordRow],
        rejected: Sequence[RejectedRow],
        ranks: Iterable[tuple[int, int, int, float]],
        runs: Iterable[tuple[int, float | None, float, int]],
    ) -> None:
        """One transaction: records, rejected sequences, rank acks, run counters.

        ``ranks``: ``(run_pk, rank, acked, session_time)`` of ranks that exist;
        ``runs``: ``(pk, last_update_time, last_activity_time, added_records)``.
        """
        with self.transaction() as conn:
            if records:
                conn.executemany(
                    "INSERT OR IGNORE INTO records (run_pk, rank, sequence, step, wall_time,"
                    " received_time, spearman, pearson, entropy_mean, score_mean, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    records,
                )
            if rejected:
                conn.executemany(
                    "INSERT OR IGNORE INTO rejected (run_pk, rank, sequence, field, reason,"
                    " received_time) VALUES (?, ?, ?, ?, ?, ?)",
                    rejected,
                )
            conn.executemany(
                "UPDATE ranks SET acked_sequence = ?, session_time = ?"
                " WHERE run_pk = ? AND rank = ?",
                [(acked, when, pk, rank) for pk, rank, acked, when in ranks],
            )
            conn.executemany(
                "UPDATE runs SET last_update_time = coalesce(?, last_update_time),"
                " last_activity_time = ?, records = records + ? WHERE pk = ?",
                [(last, activity, added, pk) for pk, last, activity, added in runs],
            )

    # ---------------------------------------------------------------- start-up

    def load_runs(self) -> list[StoredRun]:
        rows = self._conn.execute(
            "SELECT pk, run_id, display_name, info, world_size, opened_time, last_update_time,"
            " last_activity_time, status, records, kind FROM runs ORDER BY pk"
        ).fetchall()
        return [StoredRun(*row) for row in rows]

    def load_ranks(self) -> list[StoredRank]:
        conn = self._conn
        out = []
        for run_pk, rank, acked, status, session, previous, session_time in conn.execute(
            "SELECT run_pk, rank, acked_sequence, status, session, previous_session, session_time"
            " FROM ranks ORDER BY run_pk, rank"
        ).fetchall():
            pending = frozenset(
                seq
                for (seq,) in conn.execute(
                    "SELECT sequence FROM records WHERE run_pk = ? AND rank = ? AND sequence > ?"
                    " UNION SELECT sequence FROM rejected"
                    " WHERE run_pk = ? AND rank = ? AND sequence > ?",
                    (run_pk, rank, acked, run_pk, rank, acked),
                )
            )
            latest = conn.execute(
                "SELECT sequence, payload FROM records WHERE run_pk = ? AND rank = ?"
                " ORDER BY sequence DESC LIMIT 1",
                (run_pk, rank),
            ).fetchone()
            out.append(
                StoredRank(
                    run_pk,
                    rank,
                    acked,
                    status,
                    pending,
                    latest[0] if latest else 0,
                    latest[1] if latest else None,
                    session,
                    previous,
                    float(session_time or 0.0),
                )
            )
        return out

    # ---------------------------------------------------------------- alerts

    def load_alerts(self, now: float) -> list[StoredAlert]:
        """Every stored alert, oldest first; alerts left active end (``server_restart``)."""
        conn = self._conn
        with self.transaction():
            conn.execute(
                "UPDATE alerts SET active = 0, end_time = ?, end_reason = 'server_restart'"
                " WHERE active = 1",
                (now,),
            )
        rows = conn.execute(
            "SELECT run_id, display_name, name, severity, start_step, end_step, start_time,"
            " end_time, summary, description, trigger_values FROM alerts ORDER BY id"
        ).fetchall()
        out = []
        for row in rows:  # StoredAlert's fields in order, the last (trigger_values) as JSON
            values = {str(k): float(v) for k, v in json.loads(row[-1]).items()}
            fields: Any = (*row[:-1], values)
            out.append(StoredAlert(*fields))
        return out

    def insert_alert(  # noqa: PLR0917
        self,
        run_id: str,
        display_name: str,
        name: str,
        severity: str,
        start_step: int,
        start_time: float,
        reason: str,
        summary: str,
        description: str,
        values: dict[str, float],
    ) -> int:
        """Store an alert that starts; returns its row id."""
        try:
            cur = self._conn.execute(
                "INSERT INTO alerts (run_id, display_name, name, severity, active, start_step,"
                " start_time, reason, summary, description, trigger_values)"
                " VALUES (?,?,?,?,1,?,?,?,?,?,?)",
                (
                    run_id,
                    display_name,
                    name,
                    severity,
                    start_step,
                    start_time,
                    reason,
                    summary,
                    description,
                    json.dumps(values),
                ),
            )
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    def end_alert(
        self, row: int, end_step: int, end_time: float, reason: str, values: dict[str, float]
    ) -> None:
        """Store the end of the alert in row ``row``."""
        self._execute(
            "UPDATE alerts SET active = 0, end_step = ?, end_time = ?, end_reason = ?,"
            " end_values = ? WHERE id = ?",
            (end_step, end_time, reason, json.dumps(values), row),
        )


def _damaged(path: str, detail: str) -> str:
    return (
        f"database {path} is damaged ({detail[:200]}): restore it from a backup, or move it "
        "(with its -wal and -shm files) aside to start with an empty database"
    )


def read_history(conn: sqlite3.Connection, run_pk: int, limit: int) -> list[bytes]:
    """Payloads of the ``limit`` records with the highest steps, oldest first."""
    rows = conn.execute(
        "SELECT step, rank, sequence, payload FROM records WHERE run_pk = ?"
        " ORDER BY step DESC LIMIT ?",
        (run_pk, limit),
    ).fetchall()
    rows.sort(key=lambda row: (row[0], row[1], row[2]))
    return [row[3] for row in rows]
