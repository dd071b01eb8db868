"""Alert state shared by several servers on one database (PostgreSQL replicas).

The ``alerts`` table is the truth: an alert is active while its row says so,
whichever server wrote it. A server that raises an alert first looks for the
run's active row of that name and adopts it (shown active, not stored, posted or
announced again); a server ends a row only while it is still active (one end, one
resolved post, whoever owns the stream then). Every :data:`~.replicas.SYNC_PERIOD_S`
:class:`AlertSync` reads the active rows back so that every server's
``/metrics`` and API show the alerts raised or ended on the others.

Alertmanager forgets a firing alert that is not posted again, so every server
re-posts every active row it holds (fired or adopted: every run in its memory)
each re-send round, with the row's labels and ``startsAt`` (Alertmanager merges
the identical copies, as it does a Prometheus HA pair's); losing any one server
drops nothing. Right before each round the sender reads the active rows once
(:class:`ActiveCheck`, one query) and drops what another server ended; the
server that ended a row re-posts its resolve every round for
:data:`RESOLVED_RESEND_S` (as Prometheus does) so that a firing post another
server sent in the meantime is corrected. An adopted row also puts the run's
detector of that name in its firing state (:func:`seed`), so the detector's own
end condition ends it on whichever server the stream moved to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from inversion_monitor.server.database import Connection, Row
from inversion_monitor.server.detectors import RunDetectors
from inversion_monitor.server.detectors.robust import Direction, DriftDetector
from inversion_monitor.server.store import StoredAlert
from inversion_monitor.server.store_errors import StoreError

log = logging.getLogger(__name__)

# at most this many active alerts are read back per round
MAX_SHARED_ALERTS = 10_000
# seconds the server that ended a shared alert keeps re-posting its resolve (Prometheus: 15 min)
RESOLVED_RESEND_S = 900.0

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


@dataclass(frozen=True)
class ActiveRows:
    """The active rows as one query read them: ``(run display name, alertname) -> row``.

    >>> rows = ActiveRows({("run-a", "LossSpike"): 7}, complete=True)
    >>> rows.ended(("run-a", "LossSpike"), 7), rows.ended(("run-a", "LossSpike"), 6)
    (False, True)
    >>> rows.ended(("run-b", "LossSpike"), 9), ActiveRows({}, complete=False).ended(("x", "y"), 1)
    (True, False)
    """

    rows: dict[tuple[str, str], int]
    # False when the query hit its limit: a key it did not return may still be active
    complete: bool

    def ended(self, key: tuple[str, str], row: int) -> bool:
        """Whether the alert stored in ``row`` is known to have ended."""
        current = self.rows.get(key)
        if current is None:
            return self.complete
        return current != row


def active_rows(conn: Connection, limit: int = MAX_SHARED_ALERTS) -> ActiveRows:
    """Every active row in one query (the partial index ``alerts_active``)."""
    found = conn.query(
        "SELECT id, display_name, name FROM alerts WHERE active = 1 ORDER BY id LIMIT ?",
        (limit,),
    )
    rows = {(str(display), str(name)): int(row) for row, display, name in found}
    return ActiveRows(rows, complete=len(found) < limit)


class ActiveCheck:
    """:func:`active_rows` on a connection of its own, for the Alertmanager sender's thread;
    None when the database does not answer (then every held alert is posted as held).

    >>> from inversion_monitor.server.store import Store
    >>> store = Store(":memory:")
    >>> ActiveCheck(lambda: store.connection)()
    ActiveRows(rows={}, complete=True)
    """

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._failing = False

    def __call__(self) -> ActiveRows | None:
        try:
            if self._conn is None:
                self._conn = self._connect()
            rows = active_rows(self._conn)
        except StoreError as exc:
            if not self._failing:
                log.warning("cannot check the shared alerts before posting them: %s", exc)
            self._failing = True
            return None
        self._failing = False
        return rows


def seed(detectors: RunDetectors, name: str, start_step: int, summary: str) -> bool:
    """Put the run's detector of alert ``name`` in its firing state (the alert was raised
    on another server), so that its own end condition ends the adopted alert here.
    A drift detector takes the direction whose summary the alert has. False when the
    run has no such detector.

    >>> from inversion_monitor.server.detectors import AlertsConfig, Observation
    >>> dets = RunDetectors(AlertsConfig(), kind="sft")
    >>> seed(dets, "NonFiniteTraining", 4, "Training diverged: non-finite loss")
    True
    >>> ends = [dets.update(Observation(s, 0.0, loss=1.0)) for s in range(5, 25)]
    >>> [(t.name.value, t.firing, t.step) for ts in ends for t in ts]
    [('NonFiniteTraining', False, 24)]
    """
    found: Any = next((d for d in detectors.detectors if d.name.value == name), None)
    if found is None and detectors.stale is not None and detectors.stale.name.value == name:
        found = detectors.stale
    if found is None:
        return False
    found.active = True
    if hasattr(found, "_start_step"):
        found._start_step = start_step
    if isinstance(found, DriftDetector):
        sides = [side for side, text in found.summaries.items() if text == summary]
        default = Direction.UP if found.direction is Direction.BOTH else found.direction
        found.side = sides[0] if sides else default
    return True


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
