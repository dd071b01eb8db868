"""Posting alerts to Alertmanager's v2 API off the ingest path.

:meth:`AlertmanagerSink.notify` (called on the writer thread) only updates a
dict under a lock and wakes the sender thread; the sender POSTs every active
alert (``endsAt`` a few re-send periods ahead, so Alertmanager keeps it while
the server is alive) and every resolved one not yet delivered (``endsAt`` = its
end) to ``<url>/api/v2/alerts``, every ``resend_s`` seconds and on each change.
A failed POST is retried with exponential backoff (at most ``resend_s``);
resolved alerts are dropped once delivered. Memory is bounded by
``max_alerts`` (the oldest resolved alerts go first).

On a shared database (:meth:`AlertmanagerSink.share`) the sink also re-posts the
alerts other servers raised (:meth:`~AlertmanagerSink.hold`), checks the active
rows once before each POST (dropping what ended elsewhere), and re-posts each
resolve it made for a while (see :mod:`.alert_share`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.alert_share import ActiveRows

log = logging.getLogger(__name__)

SERVICE = "inversion-monitor"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def alert_payload(
    display_name: str,
    alert: monitor_pb2.Alert,
    *,
    runbook_url: str,
    now: float,
    hold_s: float,
) -> dict[str, Any]:
    """One element of the ``POST /api/v2/alerts`` body.

    >>> a = monitor_pb2.Alert(name="InversionLost", severity="critical", active=True,
    ...                       start_time=0.0, summary="s", description="d")
    >>> p = alert_payload("run-a", a, runbook_url="http://x/#{alertname}", now=10.0, hold_s=60)
    >>> p["labels"]["alertname"], p["startsAt"], p["endsAt"], p["annotations"]["runbook_url"]
    ('InversionLost', '1970-01-01T00:00:00Z', '1970-01-01T00:01:10Z', 'http://x/#InversionLost')
    >>> p["annotations"]["start_step"]
    '0'
    """
    values = ", ".join(f"{k}={v:.4g}" for k, v in sorted(alert.values.items()))
    return {
        "labels": {
            "alertname": alert.name,
            "run": display_name,
            "severity": alert.severity,
            "service": SERVICE,
        },
        "annotations": {
            "summary": f"{alert.summary} ({display_name})",
            "description": f"{alert.description} [{values}]",
            "runbook_url": runbook_url.replace("{alertname}", alert.name),
            # the training step the alert started at (annotations are strings)
            "start_step": str(alert.start_step),
        },
        "startsAt": _iso(alert.start_time),
        "endsAt": _iso(now + hold_s if alert.active else max(alert.end_time, alert.start_time)),
    }


class AlertmanagerSink:
    """Sends the server's alerts to an Alertmanager from a background thread.

    >>> sink = AlertmanagerSink("http://127.0.0.1:9", resend_s=60, start=False)
    >>> sink.notify("run-a", monitor_pb2.Alert(name="MonitorStale", severity="warning",
    ...                                        active=True, start_time=1.0))
    >>> len(sink.pending())
    1
    """

    def __init__(
        self,
        url: str,
        *,
        resend_s: float = 30.0,
        runbook_url: str = "",
        timeout_s: float = 5.0,
        max_alerts: int = 10_000,
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self._resend_s = resend_s
        self._runbook = runbook_url
        self._timeout_s = timeout_s
        self._max = max_alerts
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # (run, alertname) -> latest state of the alert
        self._alerts: dict[tuple[str, str], tuple[str, monitor_pb2.Alert]] = {}
        # shared database: the alerts' rows, and when each resolve stops being re-posted
        self._rows: dict[tuple[str, str], int] = {}
        self._resolved_until: dict[tuple[str, str], float] = {}
        self._check: Callable[[], ActiveRows | None] | None = None
        self._resolved_hold_s = 0.0
        self.sent = 0
        self.failures = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(
                target=self._run, name="inversion-monitor-alertmanager", daemon=True
            )
            self._thread.start()

    def share(self, check: Callable[[], ActiveRows | None], resolved_hold_s: float) -> None:
        """Several servers on one database: ``check`` reads the active rows before each
        POST; a resolve made here is re-posted for ``resolved_hold_s`` seconds."""
        self._check = check
        self._resolved_hold_s = resolved_hold_s

    def notify(self, display_name: str, alert: monitor_pb2.Alert) -> None:
        self.hold(display_name, alert, None)

    def hold(
        self, display_name: str, alert: monitor_pb2.Alert, row: int | None, post: bool = True
    ) -> None:
        """Keep (re-)posting ``alert`` (stored in ``row``); ``post``: at once, else from the
        next round on (an alert another server raised and posted)."""
        copy = monitor_pb2.Alert()
        copy.CopyFrom(alert)
        key = (display_name, alert.name)
        with self._lock:
            self._drop(key)
            self._alerts[key] = (display_name, copy)
            if row is not None:
                self._rows[key] = row
            if not alert.active:
                self._resolved_until[key] = self._clock() + self._resolved_hold_s
            while len(self._alerts) > self._max:
                victim = next(
                    (k for k, (_, a) in self._alerts.items() if not a.active),
                    next(iter(self._alerts)),
                )
                self._drop(victim)
        if post:
            self._wake.set()

    def _drop(self, key: tuple[str, str]) -> None:
        self._alerts.pop(key, None)
        self._rows.pop(key, None)
        self._resolved_until.pop(key, None)

    def forget(self, display_name: str, name: str) -> None:
        """Drop the alert without posting it (another server posted its end)."""
        with self._lock:
            self._drop((display_name, name))

    def _confirm(self) -> None:
        """Shared database: drop the held alerts that ended elsewhere (one query). A row is
        held only once committed (the engine runs after the push's commit), so a row the
        query does not return has ended."""
        if self._check is None:
            return
        try:
            active = self._check()
        except Exception:  # the sender thread goes on: post what is held
            log.exception("checking the shared alerts failed")
            return
        if active is None:
            return
        with self._lock:
            for key, (_, alert) in list(self._alerts.items()):
                row = self._rows.get(key)
                if alert.active and row is not None and active.ended(key, row):
                    self._drop(key)  # ended by another server: it posts the resolve
                elif not alert.active and key in active.rows and active.rows[key] != row:
                    self._drop(key)  # the alert fired again: its old resolve is moot

    def pending(self) -> list[dict[str, Any]]:
        """The body of the next POST."""
        now = self._clock()
        hold = 4 * self._resend_s
        with self._lock:
            return [
                alert_payload(name, a, runbook_url=self._runbook, now=now, hold_s=hold)
                for name, a in self._alerts.values()
            ]

    def send_once(self) -> bool:
        """POST the pending alerts; True on success (delivered resolved ones are dropped)."""
        self._confirm()
        with self._lock:
            snapshot = {k: v[1].active for k, v in self._alerts.items()}
        body = self.pending()
        if not body:
            return True
        request = urllib.request.Request(
            self.endpoint,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if not self.failures:
                log.warning("cannot post alerts to %s (will retry): %s", self.endpoint, exc)
            self.failures += 1
            return False
        self.sent += 1
        now = self._clock()
        with self._lock:
            for key, was_active in snapshot.items():
                current = self._alerts.get(key)
                resolved = not was_active and current is not None and not current[1].active
                if resolved and self._resolved_until.get(key, 0.0) <= now:
                    self._drop(key)
        return True

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            ok = self.send_once()
            if ok:
                backoff = 0.5
                wait = self._resend_s
            else:
                wait = backoff
                backoff = min(backoff * 2, self._resend_s)
            self._wake.wait(wait)
            self._wake.clear()

    def close(self) -> None:
        """Stop the sender thread (waits at most for one POST's timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self._timeout_s + 1.0)
            self._thread = None
