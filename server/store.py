"""Persistence: the server's queries, the same for SQLite and PostgreSQL (schema: :mod:`.schema`).

Tables: runs, ranks (with the writer session of each (run, rank) stream),
records, rejected sequence numbers and alerts. The :class:`Store` runs its
queries on the :class:`~.database.Database`'s writer connection, which belongs
to the single writer thread; readers take their own with
:meth:`~.database.Database.reader`. Every record is written inside the
transaction of the push that brought it, and acknowledged only after that
transaction commits.

A :class:`Store` on a SQLite file owns it (:func:`~.schema.open_database`): an
exclusive lock keeps a second server away, and a damaged file or a write-ahead
log lost after an unclean stop is refused at start. On PostgreSQL
(``postgresql://...``) connections come from a pool and several servers may
share the database.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inversion_monitor.server.backends import open_store_database
from inversion_monitor.server.database import Connection, Database, PostgresUrl
from inversion_monitor.server.store_errors import StreamMoved

log = logging.getLogger("inversion_monitor.server")

MAX_ALERTS_PER_RUN = 200

# (run_pk, rank, sequence, step, wall_time, received_time, spearman, pearson,
#  entropy_mean, score_mean, payload)
RecordRow = tuple[
    int, int, int, int, float, float, float | None, float | None, float | None, float | None, bytes
]
# (run_pk, rank, sequence, field, reason, received_time)
RejectedRow = tuple[int, int, int, str, str, float]
# (run_pk, rank, acked, session_time, session digest, the session_time it replaces)
FencedRank = tuple[int, int, int, float, str | None, float]


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
    # the newest probe record (one with inversion statistics), when newer than none
    probe_sequence: int = 0
    probe_payload: bytes | None = None


@dataclass(frozen=True)
class StoredAlert:
    """An ``alerts`` row as loaded when its run enters memory (shown inactive)."""

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
    row: int | None = None
    active: bool = False


class Store:
    """The writer's connection: schema, start-up load and one transaction per push.

    >>> store = Store(":memory:")
    >>> pk = store.insert_run("r1", "demo", "proj", b"", 2, 10.0)
    >>> store.upsert_rank(pk, 0, 0, "running")
    >>> [r.display_name for r in store.load_runs()]
    ['demo']
    >>> store.close()
    """

    def __init__(
        self, target: Path | str | PostgresUrl | Database, busy_timeout_ms: int = 5000
    ) -> None:
        self.database = open_store_database(target, busy_timeout_ms)
        # what to call the database in logs (a URL without its password)
        self.path = self.database.description
        self._conn = self.database.writer
        self._closed = False

    @property
    def connection(self) -> Connection:
        """The store's connection, for reads on the writer thread (``:memory:`` has no other)."""
        return self._conn

    @property
    def shared(self) -> bool:
        """Whether other servers may write to the same database (PostgreSQL)."""
        return self.database.shared

    def close(self) -> None:
        """Close the connections; a SQLite lock file says ``clean`` afterwards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.database.close()

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction, rolled back on any error.

        Every database error comes out as :class:`StoreError` (:class:`DiskFull`
        when the disk is full); a rollback that fails never hides the original error.
        """
        return self._conn.transaction()

    def probe_write(self) -> None:
        """A tiny write transaction (raises :class:`DiskFull` while the disk is full)."""
        with self.transaction():
            self._conn.execute("INSERT INTO probe (x) VALUES (?)", (os.urandom(64),))
            self._conn.execute("DELETE FROM probe")

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
        """Store a new run; returns its ``pk``. :class:`StreamMoved` when another server
        stored a run with the same id or display name first (shared databases)."""
        row = self._conn.query_one(
            "INSERT INTO runs (run_id, display_name, project, info, world_size, opened_time,"
            " last_activity_time, status, kind) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)"
            " ON CONFLICT DO NOTHING RETURNING pk",
            (run_id, display_name, project, info, world_size, now, now, kind),
        )
        if row is None:
            raise StreamMoved(
                f"run {run_id[:80]!r} (or the name {display_name!r}) was just opened on another "
                "server; retry"
            )
        return int(row[0])

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
        self._conn.execute(sql, params)

    # ---------------------------------------------------------------- push

    def write_push(
        self,
        records: Sequence[RecordRow],
        rejected: Sequence[RejectedRow],
        ranks: Iterable[tuple[int, int, int, float]],
        runs: Iterable[tuple[int, float | None, float, int]],
        fenced: Sequence[FencedRank] = (),
    ) -> None:
        """One transaction: records, rejected sequences, rank acks, run counters.

        ``ranks``: ``(run_pk, rank, acked, session_time)`` of ranks that exist;
        ``runs``: ``(pk, last_update_time, last_activity_time, added_records)``.
        ``fenced`` (a shared database, instead of ``ranks``): each rank's ack is
        written only if its row still has the session and session time this server
        last saw; else :class:`StreamMoved` and nothing is written.
        """
        conn = self._conn
        with self.transaction():
            if records:
                conn.insert_new("records", RECORD_COLUMNS, records)
            if rejected:
                conn.executemany(
                    "INSERT INTO rejected (run_pk, rank, sequence, field, reason,"
                    " received_time) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    rejected,
                )
            conn.executemany(
                "UPDATE ranks SET acked_sequence = ?, session_time = ?"
                " WHERE run_pk = ? AND rank = ?",
                [(acked, when, pk, rank) for pk, rank, acked, when in ranks],
            )
            changed = conn.executemany(
                "UPDATE ranks SET acked_sequence = ?, session_time = ?"
                " WHERE run_pk = ? AND rank = ? AND session = ? AND session_time = ?",
                [
                    (acked, when, pk, rank, session, seen)
                    for pk, rank, acked, when, session, seen in fenced
                ],
            )
            if changed != len(fenced):
                raise StreamMoved(
                    "another server wrote to a stream of this push at the same time; retry"
                )
            conn.executemany(
                "UPDATE runs SET last_update_time = coalesce(?, last_update_time),"
                " last_activity_time = ?, records = records + ? WHERE pk = ?",
                [(last, activity, added, pk) for pk, last, activity, added in runs],
            )

    # ---------------------------------------------------------------- start-up

    def load_runs(self) -> list[StoredRun]:
        rows = self._conn.query(
            "SELECT pk, run_id, display_name, info, world_size, opened_time, last_update_time,"
            " last_activity_time, status, records, kind FROM runs ORDER BY pk"
        )
        return [stored_run(row) for row in rows]

    def load_ranks(self, run_pk: int | None = None) -> list[StoredRank]:
        """The ``ranks`` rows of every run (of run ``run_pk`` only), with what rebuilding
        their acknowledgement state needs; indexed queries per rank."""
        conn = self._conn
        where, params = ("", ()) if run_pk is None else (" WHERE run_pk = ?", (run_pk,))
        out = []
        for run_pk_, rank, acked, status, session, previous, session_time in conn.query(
            "SELECT run_pk, rank, acked_sequence, status, session, previous_session, session_time"
            f" FROM ranks{where} ORDER BY run_pk, rank",
            params,
        ):
            pending = frozenset(
                seq
                for (seq,) in conn.query(
                    "SELECT sequence FROM records WHERE run_pk = ? AND rank = ? AND sequence > ?"
                    " UNION SELECT sequence FROM rejected"
                    " WHERE run_pk = ? AND rank = ? AND sequence > ?",
                    (run_pk_, rank, acked, run_pk_, rank, acked),
                )
            )
            latest = conn.query_one(
                "SELECT sequence, payload FROM records WHERE run_pk = ? AND rank = ?"
                " ORDER BY sequence DESC LIMIT 1",
                (run_pk_, rank),
            )
            # health-only records have none of these: scans back over them to the last probe
            probe = conn.query_one(
                "SELECT sequence, payload FROM records WHERE run_pk = ? AND rank = ?"
                " AND (spearman IS NOT NULL OR pearson IS NOT NULL"
                " OR entropy_mean IS NOT NULL OR score_mean IS NOT NULL)"
                " ORDER BY sequence DESC LIMIT 1",
                (run_pk_, rank),
            )
            out.append(
                StoredRank(
                    run_pk_,
                    rank,
                    acked,
                    status,
                    pending,
                    latest[0] if latest else 0,
                    bytes(latest[1]) if latest else None,
                    session,
                    previous,
                    float(session_time or 0.0),
                    probe[0] if probe else 0,
                    bytes(probe[1]) if probe else None,
                )
            )
        return out

    # ---------------------------------------------------------------- alerts

    def end_active_alerts(self, now: float) -> None:
        """End every alert left active (``server_restart``): the detectors start afresh."""
        with self.transaction():
            self._conn.execute(
                "UPDATE alerts SET active = 0, end_time = ?, end_reason = 'server_restart'"
                " WHERE active = 1",
                (now,),
            )

    def load_alerts(self, run_id: str) -> list[StoredAlert]:
        """The last :data:`MAX_ALERTS_PER_RUN` alerts of run ``run_id``, oldest first (indexed)."""
        rows = self._conn.query(
            "SELECT run_id, display_name, name, severity, start_step, end_step, start_time,"
            " end_time, summary, description, trigger_values, id, active FROM alerts"
            " WHERE run_id = ? ORDER BY id DESC LIMIT ?",
            (run_id, MAX_ALERTS_PER_RUN),
        )
        out = []
        for row in reversed(rows):  # StoredAlert's fields in order, trigger_values as JSON
            values = {str(k): float(v) for k, v in json.loads(row[-3]).items()}
            fields: Any = (*row[:-3], values, int(row[-2]), bool(row[-1]))
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
        row = self._conn.query_one(
            "INSERT INTO alerts (run_id, display_name, name, severity, active, start_step,"
            " start_time, reason, summary, description, trigger_values)"
            " VALUES (?,?,?,?,1,?,?,?,?,?,?) RETURNING id",
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
        assert row is not None
        return int(row[0])

    def end_alert(
        self, row: int, end_step: int, end_time: float, reason: str, values: dict[str, float]
    ) -> None:
        """Store the end of the alert in row ``row``."""
        self._execute(
            "UPDATE alerts SET active = 0, end_step = ?, end_time = ?, end_reason = ?,"
            " end_values = ? WHERE id = ?",
            (end_step, end_time, reason, json.dumps(values), row),
        )


def stored_run(row: Sequence[Any]) -> StoredRun:
    """A :class:`StoredRun` from a row of :data:`RUN_COLUMNS`."""
    fields = list(row)
    fields[3] = bytes(fields[3])  # PostgreSQL may hand BYTEA back as a memoryview
    return StoredRun(*fields)


RECORD_COLUMNS = (
    "run_pk",
    "rank",
    "sequence",
    "step",
    "wall_time",
    "received_time",
    "spearman",
    "pearson",
    "entropy_mean",
    "score_mean",
    "payload",
)
RUN_COLUMNS = (
    "pk, run_id, display_name, info, world_size, opened_time, last_update_time,"
    " last_activity_time, status, records, kind"
)


def read_history(conn: Connection, run_pk: int, limit: int) -> list[bytes]:
    """Payloads of the ``limit`` records with the highest steps, oldest first."""
    rows = conn.query(
        "SELECT step, rank, sequence, payload FROM records WHERE run_pk = ?"
        " ORDER BY step DESC LIMIT ?",
        (run_pk, limit),
    )
    rows.sort(key=lambda row: (row[0], row[1], row[2]))
    return [bytes(row[3]) for row in rows]
