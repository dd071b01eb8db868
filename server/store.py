"""SQLite persistence (WAL mode): runs, ranks, records and rejected sequence numbers.

One :class:`Store` connection belongs to the single writer thread; readers
open their own connection with :meth:`Store.reader` (WAL lets them run while
the writer commits). Every record is written inside the transaction of the
push that brought it, and acknowledged only after that transaction commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
# schema version -> the statements that bring a database of the previous version to it
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT ''",),
}

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
"""

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
    # "sft", "rl", "custom" or "" (unknown; runs stored before schema version 2)
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


class StoreError(RuntimeError):
    """The database refused an operation (disk full, locked, corrupt)."""


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
        try:
            self._conn = connect(self.path, busy_timeout_ms)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this server knows up to "
                    f"{SCHEMA_VERSION}: upgrade inversion-monitor or use another --db"
                )
            if 0 < version < SCHEMA_VERSION:
                self._migrate(version)
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc

    def _migrate(self, version: int) -> None:
        """Bring a database of schema ``version`` up to :data:`SCHEMA_VERSION`, one transaction."""
        with self.transaction() as conn:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back (and re-raised) on any error."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"database busy or unavailable: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database write failed: {exc}") from exc
            raise

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
            raise StoreError(f"database write failed: {exc}") from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_run(
        self, pk: int, *, world_size: int, last_activity_time: float, status: str
    ) -> None:
        self._execute(
            "UPDATE runs SET world_size = ?, last_activity_time = ?, status = ? WHERE pk = ?",
            (world_size, last_activity_time, status, pk),
        )

    def upsert_rank(self, run_pk: int, rank: int, acked: int, status: str) -> None:
        self._execute(
            "INSERT INTO ranks (run_pk, rank, acked_sequence, status) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (run_pk, rank) DO UPDATE SET acked_sequence = excluded.acked_sequence,"
            " status = excluded.status",
            (run_pk, rank, acked, status),
        )

    def _execute(self, sql: str, params: Sequence[object]) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"database write failed: {exc}") from exc

    # ---------------------------------------------------------------- push

    def write_push(
        self,
        records: Sequence[RecordRow],
        rejected: Sequence[RejectedRow],
        ranks: Iterable[tuple[int, int, int, str]],
        runs: Iterable[tuple[int, float | None, float, int]],
    ) -> None:
        """One transaction: records, rejected sequences, rank acks, run counters.

        ``ranks``: ``(run_pk, rank, acked, status)``; ``runs``:
        ``(pk, last_update_time, last_activity_time, added_records)``.
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
                "INSERT INTO ranks (run_pk, rank, acked_sequence, status) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (run_pk, rank) DO UPDATE SET"
                " acked_sequence = excluded.acked_sequence",
                list(ranks),
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
        for run_pk, rank, acked, status in conn.execute(
            "SELECT run_pk, rank, acked_sequence, status FROM ranks ORDER BY run_pk, rank"
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
                )
            )
        return out


def read_history(conn: sqlite3.Connection, run_pk: int, limit: int) -> list[bytes]:
    """Payloads of the ``limit`` records with the highest steps, oldest first."""
    rows = conn.execute(
        "SELECT step, rank, sequence, payload FROM records WHERE run_pk = ?"
        " ORDER BY step DESC LIMIT ?",
        (run_pk, limit),
    ).fetchall()
    rows.sort(key=lambda row: (row[0], row[1], row[2]))
    return [row[3] for row in rows]
