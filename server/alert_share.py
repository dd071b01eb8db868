"""Alert state shared by several servers on one database (PostgreSQL replicas).

The ``alerts`` table is the truth: an alert is active while its row says so,
whichever server wrote it. A server that raises an alert first looks for the
run's active row of that name and adopts it (shown active, not stored, posted or
announced again); a server ends a row only while it is still active (one end, one
resolved post, whoever owns the stream then). Every :data:`~.replicas.SYNC_PERIOD_S`
:class:`AlertSync` reads the active rows back so that every server's
``/metrics`` and API show the alerts raised or ended on the others.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from inversion_monitor.server.database import Connection, Row
from inversion_monitor.server.store import StoredAlert

# at most this many active alerts are read back per round
MAX_SHARED_ALERTS = 10_000

_COLUMNS = (
    "run_id, display_name, name, severity, start_step, end_step, start_time,"
    " end_time, summary, description, trigger_values, id, active"
)


def _stored(row: Row) -> StoredAlert:
    values = {str(k): float(v) for k, v in json.loads(row[10]).items()}
    fields: Any = (*row[:10], values, int(row[11]), bool(row[12]))
    return StoredAlert(*fields)


def find_active(conn: Connection, run_id: str, name: str) -> StoredAlert | None:
    """The run's active alert ``name`` as stored (by any server), or None."""
    row = conn.query_one(
        f"SELECT {_COLUMNS} FROM alerts WHERE run_id = ? AND name = ? AND active = 1"
        " ORDER BY id LIMIT 1",
        (run_id, name),
    )
    return None if row is None else _stored(row)


def active_alerts(conn: Connection, limit: int = MAX_SHARED_ALERTS) -> list[StoredAlert]:
    """Every active alert as stored, oldest first (the partial index ``alerts_active``)."""
    rows = conn.query(
        f"SELECT {_COLUMNS} FROM alerts WHERE active = 1 ORDER BY id LIMIT ?", (limit,)
    )
    return [_stored(row) for row in rows]


def load(conn: Connection, row: int) -> StoredAlert | None:
    """The alert in row ``row`` (its end, once another server ended it)."""
    found = conn.query_one(f"SELECT {_COLUMNS} FROM alerts WHERE id = ?", (row,))
    return None if found is None else _stored(found)


def end_once(  # noqa: PLR0917
    conn: Connection,
    row: int,
    end_step: int,
    end_time: float,
    reason: str,
    values: dict[str, float],
) -> bool:
    """End the alert in row ``row`` if it is still active; True when this call ended it."""
    done = conn.query_one(
        "UPDATE alerts SET active = 0, end_step = ?, end_time = ?, end_reason = ?,"
        " end_values = ? WHERE id = ? AND active = 1 RETURNING id",
        (end_step, end_time, reason, json.dumps(values), row),
    )
    return done is not None


class SharedAlerts(Protocol):
    """What :class:`AlertSync` drives (an :class:`~.alerts.AlertEngine`)."""

    def reconcile(self, active: list[StoredAlert]) -> int: ...


class AlertSync:
    """Reads the stored active alerts back into the engine (writer thread, every round).

    >>> from inversion_monitor.server.store import Store
    >>> from inversion_monitor.server.alerts import AlertEngine
    >>> store = Store(":memory:")
    >>> AlertSync(store.connection, AlertEngine(store=store)).run()
    0
    """

    def __init__(self, conn: Connection, engine: SharedAlerts) -> None:
        self._conn = conn
        self._engine = engine

    def run(self) -> int:
        """One round; returns how many alerts changed state in this server's memory."""
        return self._engine.reconcile(active_alerts(self._conn))
