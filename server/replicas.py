"""Several servers on one shared database: each reads back the runs the others changed.

Every server keeps the runs it serves in memory (``/metrics``, the JSON API,
the live page). On a shared database (PostgreSQL) :class:`RunSync` runs
every :data:`SYNC_PERIOD_S` seconds on the writer thread and reads back the
runs whose stored activity is newer than this server's copy, so every server
shows every run within a few seconds of its last write, wherever it was written.
"""

from __future__ import annotations

import time

from inversion_monitor.server.ingest import Ingestor

SYNC_PERIOD_S = 2.0
# activity times come from each server's clock: look this far back for skew between them
CLOCK_MARGIN_S = 5.0


class RunSync:
    """Reads back the runs other servers changed since the last round (writer thread).

    >>> from inversion_monitor.server.config import ServerConfig
    >>> from inversion_monitor.server.store import Store
    >>> sync = RunSync(Ingestor(Store(":memory:"), ServerConfig()))
    >>> sync.run(now=100.0)
    0
    """

    def __init__(self, ingestor: Ingestor, max_runs: int = 1000) -> None:
        self._ingestor = ingestor
        self._max_runs = max_runs
        self._since = time.time() - CLOCK_MARGIN_S

    def run(self, now: float | None = None) -> int:
        """One round; returns how many runs were read back."""
        now = time.time() if now is None else now
        ingestor = self._ingestor
        rows = ingestor.store.connection.query(
            "SELECT run_id, last_activity_time FROM runs WHERE last_activity_time > ?"
            " ORDER BY last_activity_time LIMIT ?",
            (self._since, self._max_runs),
        )
        read = 0
        for run_id, activity in rows:
            view = ingestor.views.get(run_id)
            if view is None or view.last_activity < activity:
                read += ingestor.refresh(run_id) is not None
        if len(rows) < self._max_runs:
            self._since = now - CLOCK_MARGIN_S
        else:  # more changed than one round reads: go on from the last one read
            self._since = float(rows[-1][1])
        return read
