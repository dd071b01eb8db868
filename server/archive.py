"""Runs past retention live in the database only: what reads one back on demand.

The :class:`~.ingest.Ingestor` keeps in memory the runs active within the
retention window (at most ``max_active_runs``) and drops the others; a call
that names a dropped run (OpenRun, Push, CloseRun, GetRun, ListRuns) reads it
back with these indexed queries (its ranks with :meth:`~.store.Store.load_ranks`)
on the writer's connection, so memory follows the limits however many runs the
database holds.
"""

from __future__ import annotations

from collections.abc import Collection

from inversion_monitor.server.database import Connection
from inversion_monitor.server.store import RUN_COLUMNS, StoredRun, stored_run


def find_stored_run(conn: Connection, key: str) -> StoredRun | None:
    """The ``runs`` row whose run id, else whose display name, is ``key`` (None: none)."""
    for column in ("run_id", "display_name"):  # both UNIQUE: indexed
        row = conn.query_one(f"SELECT {RUN_COLUMNS} FROM runs WHERE {column} = ?", (key,))
        if row is not None:
            return stored_run(row)
    return None


def name_taken(conn: Connection, name: str) -> bool:
    """True when a stored run has ``name`` as its display name or its run id."""
    row = conn.query_one(
        "SELECT 1 FROM runs WHERE display_name = ? UNION ALL SELECT 1 FROM runs WHERE run_id = ?"
        " LIMIT 1",
        (name, name),
    )
    return row is not None


def recent_run_ids(
    conn: Connection,
    limit: int,
    *,
    project: str | None,
    projects: Collection[str] | None,
    exclude: Collection[str],
) -> list[str]:
    """Run ids by latest activity, newest first: of ``project`` (None: any) within
    ``projects`` (None: every project), without those in ``exclude``; at most ``limit``."""
    sql = "SELECT run_id FROM runs"
    clauses: list[str] = []
    params: list[object] = []
    if project is not None:
        clauses.append("project = ?")
        params.append(project)
    if projects is not None:
        clauses.append(f"project IN ({', '.join('?' * len(projects))})")
        params.extend(projects)
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY last_activity_time DESC LIMIT ?"
    params.append(limit + len(exclude))
    found = [run_id for (run_id,) in conn.query(sql, params)]
    return [run_id for run_id in found if run_id not in exclude][:limit]
