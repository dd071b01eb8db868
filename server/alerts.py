"""The alert engine: detectors per run as an ingest listener, alert state and storage.

Records of a run's lowest rank drive its detectors (see :mod:`.detectors`);
each transition opens or closes an :class:`~monitor_pb2.Alert`, kept in memory
(for ``GetRun``, ``/metrics``) and written to the ``alerts`` table through the
server's :class:`~.store.Store` (on the writer thread only).
Per-run state follows the runs the ingestor keeps in memory (a
:class:`~.listeners.RunListener`): when a run enters memory (restored at
start-up, opened, or read back after pruning) its stored alerts come back as
history (the last 200) and its detectors start afresh; when it leaves memory
(idle past retention) its state goes and its active alerts end (reason
``run_closed``, as the stale alert's does). At start-up the alerts left active
end with reason ``server_restart``. Either way an alert fires again if its
condition persists in the run's next records.

On a shared database (several servers, :mod:`.alert_share`) the stored rows are
the truth instead: nothing ends at start-up, a run's active rows come back
active, an alert raised for a run whose row of that name is active is adopted
(not stored, posted or logged again), a row ends once (by the server whose
detectors see the run recover; an adopted row puts that detector in its firing
state), :meth:`AlertEngine.reconcile` takes in the alerts the other servers
started and ended, and every active row held here is re-posted by the sinks that
re-post (``hold``: Alertmanager), fired here or not.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import alert_share
from inversion_monitor.server.detectors import (
    AlertName,
    AlertsConfig,
    Observation,
    Reason,
    RunDetectors,
    Severity,
    Transition,
)
from inversion_monitor.server.record_values import read_values
from inversion_monitor.server.schema import StoreError
from inversion_monitor.server.store import MAX_ALERTS_PER_RUN, Store, StoredAlert

log = logging.getLogger(__name__)


class AlertSink(Protocol):
    """Something told about every alert that starts or ends (e.g. Alertmanager)."""

    def notify(self, display_name: str, alert: monitor_pb2.Alert) -> None: ...


class ViewLike(Protocol):
    """What the stale check reads of a run (an ingest ``RunView``)."""

    @property
    def display_name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def last_update_time(self) -> float | None: ...
    @property
    def opened_time(self) -> float: ...
    @property
    def last_activity(self) -> float: ...


@dataclass
class _RunAlerts:
    display_name: str
    detectors: RunDetectors
    rank: int
    last_step: int = 0
    # None when made by the stale check before any event: detectors are rebuilt at its first record
    kind: str | None = None
    history: list[monitor_pb2.Alert] = field(default_factory=list)
    # alert name -> (its proto in history, its row id)
    open: dict[str, tuple[monitor_pb2.Alert, int | None]] = field(default_factory=dict)
    # (alertname, severity) -> 1.0 while active, 0.0 after: the alert_active gauge
    gauges: dict[tuple[str, str], float] = field(default_factory=dict)
    # shared database: alert name -> row of the alerts adopted from another server
    adopted: dict[str, int] = field(default_factory=dict)


class AlertEngine:
    """Runs the detectors on every stored record; keeps and stores the alerts.

    >>> engine = AlertEngine(AlertsConfig())
    >>> rec = monitor_pb2.StepRecord(run_id="r1", step=1)
    >>> engine.on_record("r1", "demo", rec)
    >>> engine.alerts("r1"), engine.active("r1")
    ([], [])
    """

    def __init__(
        self,
        config: AlertsConfig | None = None,
        store: Store | None = None,
        *,
        sinks: Iterable[AlertSink] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or AlertsConfig()
        self._store = store
        self._sinks = list(sinks)
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _RunAlerts] = {}
        self._store_failing = False
        # several servers on one database: the alerts table holds the shared state
        self._shared = store is not None and store.shared
        if store is not None and not self._shared:
            try:
                store.end_active_alerts(self._clock())
            except StoreError as exc:
                log.warning("could not end the alerts left active: %s", exc)

    def _stored_history(self, run_id: str) -> list[StoredAlert]:
        """The run's stored alerts (the last 200)."""
        if self._store is None:
            return []
        try:
            return self._store.load_alerts(run_id)
        except StoreError as exc:
            log.warning("could not load the stored alerts of run %s: %s", run_id, exc)
            return []

    # ---------------------------------------------------------------- writer thread

    def on_run_open(self, run_id: str, display_name: str, info: monitor_pb2.RunInfo) -> None:
        """The run entered memory: its detectors (for its kind) and its stored alerts."""
        if run_id in self._runs:
            return
        state = _RunAlerts(
            display_name, RunDetectors(self.config, info.kind), 1 << 30, kind=info.kind
        )
        for row in self._stored_history(run_id):
            # single server: all inactive, the detectors start afresh; shared: as stored
            alert = _alert(row, active=self._shared and row.active)
            state.history.append(alert)
            state.gauges[(alert.name, alert.severity)] = 1.0 if alert.active else 0.0
            if alert.active and row.row is not None:
                state.open[alert.name] = (alert, row.row)
                state.adopted[alert.name] = row.row
                alert_share.seed(state.detectors, row.name, row.start_step, row.summary)
                self._tell(display_name, alert, row.row, post=False)
        with self._lock:
            self._runs[run_id] = state

    def on_run_pruned(self, run_id: str) -> None:
        """The run left memory (idle past retention): its active alerts end, its state goes."""
        state = self._runs.get(run_id)
        if state is None:
            return
        now = self._clock()
        for alert, _ in list(state.open.values()):
            self._apply(
                run_id,
                state,
                Transition(
                    AlertName(alert.name),
                    Severity(alert.severity),
                    firing=False,
                    reason=Reason.RUN_CLOSED,
                    step=state.last_step,
                    time=now,
                    summary=alert.summary,
                    message=f"run {state.display_name} idle past the retention window",
                ),
            )
        with self._lock:
            del self._runs[run_id]

    def on_record(self, run_id: str, display_name: str, record: monitor_pb2.StepRecord) -> None:
        """:meth:`on_values` of the record's values."""
        self.on_values(run_id, display_name, read_values(record))

    def on_values(self, run_id: str, display_name: str, obs: Observation) -> None:
        """Feed the run's detectors one stored record's values (those of its lowest rank)."""
        state = self._runs.get(run_id)
        if state is None:  # a run never announced (no RunListener events): of unknown kind
            state = _RunAlerts(display_name, RunDetectors(self.config, ""), obs.rank, kind="")
            with self._lock:
                self._runs[run_id] = state
        elif state.kind is None:  # made by the stale check: no record fed yet
            state.kind = ""
            stale = state.detectors.stale
            state.detectors = RunDetectors(self.config, state.kind)
            state.detectors.stale = stale
            for alert, _ in state.open.values():  # adopted meanwhile: their detectors fire
                alert_share.seed(state.detectors, alert.name, alert.start_step, alert.summary)
        rank = obs.rank
        if rank > state.rank:
            return
        state.rank = rank
        step, last = obs.step, state.last_step
        state.last_step = step if step > last else last  # max(last, step), without the call
        for transition in state.detectors.update(obs):
            self._apply(run_id, state, transition)

    def check_stale(
        self,
        views: Mapping[str, ViewLike],
        now: float | None = None,
        retention_s: float = math.inf,
    ) -> None:
        """Evaluate :class:`MonitorStale` for every known run (call on a timer).

        A run idle for longer than ``retention_s`` (it has left /metrics) counts as
        no longer open: its stale alert ends (reason ``run_closed``).
        """
        now = self._clock() if now is None else now
        for run_id, view in list(views.items()):
            state = self._runs.get(run_id)
            if state is None:
                state = _RunAlerts(view.display_name, RunDetectors(self.config), 1 << 30)
                with self._lock:
                    self._runs[run_id] = state
            stale = state.detectors.stale
            if stale is None:
                continue
            last = view.last_update_time if view.last_update_time is not None else view.opened_time
            is_open = view.status == "running" and now - view.last_activity <= retention_s
            transition = stale.check(now, last, state.last_step, is_open)
            if transition is not None:
                self._apply(run_id, state, transition)

    def _apply(self, run_id: str, state: _RunAlerts, t: Transition) -> None:
        name = t.name.value
        if t.firing and self._shared and self._adopt(run_id, state, name):
            return
        if t.firing:
            alert = monitor_pb2.Alert(
                name=name,
                severity=t.severity.value,
                active=True,
                start_step=t.step,
                start_time=t.time,
                summary=t.summary,
                description=t.message,
            )
            for key, value in t.values.items():
                alert.values[key] = value
            row = self._write_start(run_id, state.display_name, alert, t)
            with self._lock:
                state.history.append(alert)
                del state.history[:-MAX_ALERTS_PER_RUN]
                state.open[name] = (alert, row)
                state.gauges[(name, alert.severity)] = 1.0
        else:
            found = state.open.get(name)
            if found is None:
                return
            alert, row = found
            with self._lock:
                alert.active = False
                alert.end_step = t.step
                alert.end_time = t.time
                del state.open[name]
                state.adopted.pop(name, None)
                state.gauges[(name, alert.severity)] = 0.0
            if not self._write_end(row, t):  # another server ended it first: it posted the end
                self._forget(state.display_name, name)
                return
        log.info(
            "alert %s %s for run %s: %s",
            name,
            "firing" if t.firing else "resolved",
            state.display_name,
            t.message,
        )
        self._tell(state.display_name, alert, row)

    def _tell(
        self, display_name: str, alert: monitor_pb2.Alert, row: int | None, *, post: bool = True
    ) -> None:
        """Tell the sinks about ``alert`` (stored in ``row``). On a shared database a sink that
        re-posts (``hold``, e.g. Alertmanager) keeps every active alert held here, fired or
        adopted (``post=False``: from its next round on; the firing server posted it)."""
        for sink in self._sinks:
            try:
                hold = getattr(sink, "hold", None) if self._shared else None
                if hold is not None:
                    hold(display_name, alert, row, post)
                elif post:
                    sink.notify(display_name, alert)
            except Exception:
                log.exception("alert sink %r failed", sink)

    def _forget(self, display_name: str, name: str) -> None:
        """The alert ended on another server (which posts its end): sinks drop it unposted."""
        for sink in self._sinks:
            forget = getattr(sink, "forget", None)  # e.g. AlertmanagerSink: no post
            if forget is not None:
                try:
                    forget(display_name, name)
                except Exception:
                    log.exception("alert sink %r failed", sink)

    def _stored(self, ok: bool, what: str, exc: StoreError | None = None) -> None:
        """One log line per change between storing alerts and failing to."""
        if not ok and not self._store_failing:
            log.warning("could not store %s (alerts stay in memory): %s", what, exc)
        elif ok and self._store_failing:
            log.info("storing alerts again")
        self._store_failing = not ok

    def _write_start(
        self, run_id: str, display_name: str, alert: monitor_pb2.Alert, t: Transition
    ) -> int | None:
        if self._store is None:
            return None
        try:
            row = self._store.insert_alert(
                run_id,
                display_name,
                alert.name,
                alert.severity,
                t.step,
                t.time,
                t.reason.value,
                t.summary,
                t.message,
                dict(t.values),
            )
        except StoreError as exc:
            self._stored(False, f"alert {alert.name} of run {display_name}", exc)
            return None
        self._stored(True, "")
        return row

    def _write_end(self, row: int | None, t: Transition) -> bool:
        """Store the end; False when, on a shared database, another server ended the row."""
        if row is None or self._store is None:
            return True
        values = dict(t.values)
        try:
            if self._shared:
                conn = self._store.connection
                ended = alert_share.end_once(conn, row, t.step, t.time, t.reason.value, values)
            else:
                self._store.end_alert(row, t.step, t.time, t.reason.value, values)
                ended = True
        except StoreError as exc:
            self._stored(False, f"the end of alert {t.name.value}", exc)
            return True
        self._stored(True, "")
        return ended

    # ---------------------------------------------------------------- shared database

    def _adopt(self, run_id: str, state: _RunAlerts, name: str) -> bool:
        """True when the alert ``name`` of the run is already active (held here or stored
        by another server): it is adopted, not stored, posted or logged again."""
        if name in state.open:
            return True
        assert self._store is not None
        try:
            row = alert_share.find_active(self._store.connection, run_id, name)
        except StoreError as exc:
            self._stored(False, f"alert {name} of run {state.display_name}", exc)
            return False
        if row is None or row.row is None:
            return False
        self._take_in(state, row)
        log.info("alert %s of run %s adopted (raised on another server)", name, row.display_name)
        return True

    def _take_in(self, state: _RunAlerts, row: StoredAlert) -> None:
        """Show the stored active alert ``row`` (raised on another server) as active here."""
        assert row.row is not None
        alert = _alert(row, active=True)
        with self._lock:
            state.history = [
                a
                for a in state.history
                if not (a.name == row.name and a.start_time == row.start_time)
            ]
            state.history.append(alert)
            del state.history[:-MAX_ALERTS_PER_RUN]
            state.open[row.name] = (alert, row.row)
            state.adopted[row.name] = row.row
            state.gauges[(row.name, row.severity)] = 1.0
        alert_share.seed(state.detectors, row.name, row.start_step, row.summary)
        self._tell(state.display_name, alert, row.row, post=False)

    def reconcile(self, active: list[StoredAlert]) -> int:
        """Take in the stored active alerts ``active`` (every server's) for the runs held here:
        those started elsewhere show active, those ended elsewhere inactive (writer thread).
        Returns how many alerts changed state here; nothing is posted (the other server did).
        """
        by_run: dict[str, dict[str, StoredAlert]] = {}
        for row in active:
            by_run.setdefault(row.run_id, {}).setdefault(row.name, row)
        changed = 0
        for run_id, state in list(self._runs.items()):
            stored = by_run.get(run_id, {})
            for name, row in stored.items():
                held = state.open.get(name)
                if held is None or (held[1] is not None and held[1] != row.row):
                    self._take_in(state, row)
                    changed += 1
            for name, (alert, row_id) in list(state.open.items()):
                if row_id is None or (name in stored and stored[name].row == row_id):
                    continue
                self._ended_elsewhere(state, alert, row_id)
                changed += 1
        return changed

    def _ended_elsewhere(self, state: _RunAlerts, alert: monitor_pb2.Alert, row: int) -> None:
        assert self._store is not None
        try:
            ended = alert_share.load(self._store.connection, row)
        except StoreError:
            ended = None
        with self._lock:
            alert.active = False
            if ended is not None:
                alert.end_step = ended.end_step or 0
                alert.end_time = ended.end_time or 0.0
            state.open.pop(alert.name, None)
            state.adopted.pop(alert.name, None)
            state.gauges[(alert.name, alert.severity)] = 0.0
        self._forget(state.display_name, alert.name)

    def close(self) -> None:
        """Nothing to release: the store belongs to the server."""

    # ---------------------------------------------------------------- any thread

    def alerts(self, run_id: str) -> list[monitor_pb2.Alert]:
        """Copies of the run's alerts, oldest first (at most the last 200)."""
        with self._lock:
            state = self._runs.get(run_id)
            return [_copy(a) for a in state.history] if state else []

    def run_count(self) -> int:
        """How many runs the engine holds state for (those in the ingestor's memory)."""
        with self._lock:
            return len(self._runs)

    def active(self, run_id: str) -> list[monitor_pb2.Alert]:
        with self._lock:
            state = self._runs.get(run_id)
            return [_copy(a) for a, _ in state.open.values()] if state else []

    def gauge_samples(
        self, include: Callable[[str], bool] = lambda run_id: True
    ) -> list[tuple[str, str, str, float]]:
        """``(run, alertname, severity, 0|1)`` for every alert a run has had."""
        out: list[tuple[str, str, str, float]] = []
        with self._lock:
            items = [
                (run_id, s.display_name, dict(s.gauges))
                for run_id, s in self._runs.items()
                if s.gauges
            ]
        for run_id, display_name, gauges in items:
            if gauges and include(run_id):
                out.extend((display_name, n, sev, v) for (n, sev), v in gauges.items())
        out.sort()
        return out


def _alert(row: StoredAlert, *, active: bool) -> monitor_pb2.Alert:
    """The proto of a stored alert, shown ``active`` or not."""
    alert = monitor_pb2.Alert(
        name=row.name,
        severity=row.severity,
        active=active,
        start_step=row.start_step,
        end_step=0 if active else row.end_step or 0,
        start_time=row.start_time,
        end_time=0.0 if active else row.end_time or 0.0,
        summary=row.summary,
        description=row.description,
    )
    for key, value in row.values.items():
        alert.values[key] = value
    return alert


def _copy(alert: monitor_pb2.Alert) -> monitor_pb2.Alert:
    out = monitor_pb2.Alert()
    out.CopyFrom(alert)
    return out
