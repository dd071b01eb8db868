"""A tiny local alert receiver: what the demo points the server's Alertmanager sink at.

:class:`AlertReceiver` listens on loopback and accepts what the server's
:class:`~inversion_monitor.server.alertmanager.AlertmanagerSink` posts
(``POST /api/v2/alerts``, a JSON list in Alertmanager's v2 format). Each alert
seen firing for the first time (per run, name and start) is queued as a
:class:`ReceivedAlert`; :meth:`AlertReceiver.take` hands them over.

>>> receiver = AlertReceiver().start()
>>> receiver.url.startswith("http://127.0.0.1:")
True
>>> receiver.stop()
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = "/api/v2/alerts"


@dataclass(frozen=True)
class ReceivedAlert:
    """One firing alert as the webhook received it.

    >>> a = ReceivedAlert("EntropyCollapse", "warning", "demo", 42, "s", "d [x=1]", 1.0)
    >>> a.line()
    'EntropyCollapse (warning) on run demo at step 42: d'
    """

    name: str
    severity: str
    run: str
    step: int | None
    summary: str
    description: str
    received_at: float

    def line(self) -> str:
        """``NAME (severity) on run RUN at step N: description`` (without its values)."""
        where = f" at step {self.step}" if self.step is not None else ""
        text = self.description.rsplit(" [", 1)[0] or self.summary
        return f"{self.name} ({self.severity}) on run {self.run}{where}: {text}"


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_alerts(body: Any, *, now: float) -> list[tuple[tuple[str, str, str], ReceivedAlert]]:
    """The firing alerts of a posted body (``endsAt`` in the future), each with its identity.

    Raises ``ValueError`` naming what is wrong with a malformed body.
    """
    if not isinstance(body, list):
        raise ValueError(f"expected a JSON list of alerts, got {type(body).__name__}")
    firing = []
    for item in body:
        try:
            labels, notes = item["labels"], item["annotations"]
            ends = _parse_time(item["endsAt"])
            key = (labels["run"], labels["alertname"], item["startsAt"])
            step_text = notes.get("start_step")
            alert = ReceivedAlert(
                name=labels["alertname"],
                severity=labels.get("severity", ""),
                run=labels["run"],
                step=int(step_text) if step_text is not None else None,
                summary=notes.get("summary", ""),
                description=notes.get("description", ""),
                received_at=now,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed alert {item!r}: {exc}") from exc
        if ends > now:
            firing.append((key, alert))
    return firing


class AlertReceiver:
    """Receives the server's alerts on ``127.0.0.1:port`` (0: a free port) from a thread."""

    def __init__(self, port: int = 0) -> None:
        self._lock = threading.Condition()  # notified on every post
        self._seen: set[tuple[str, str, str]] = set()
        self._queue: list[ReceivedAlert] = []
        self.received: list[ReceivedAlert] = []
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != PATH:
                    self.send_error(404, f"post alerts to {PATH}")
                    return
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    alerts = parse_alerts(json.loads(self.rfile.read(length)), now=time.time())
                except ValueError as exc:
                    self.send_error(400, str(exc))
                    return
                receiver._add(alerts)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the demo prints what it receives itself

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to give the server as its Alertmanager URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> AlertReceiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="demo-alert-receiver", daemon=True
        )
        self._thread.start()
        return self

    def _add(self, alerts: list[tuple[tuple[str, str, str], ReceivedAlert]]) -> None:
        with self._lock:
            self.posts += 1
            for key, alert in alerts:
                if key not in self._seen:
                    self._seen.add(key)
                    self._queue.append(alert)
                    self.received.append(alert)
            self._lock.notify_all()

    def take(self) -> list[ReceivedAlert]:
        """The alerts received since the last call."""
        with self._lock:
            queued, self._queue = self._queue, []
        return queued

    def wait(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until ``predicate(self.received)`` holds; False after ``timeout_s``."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: predicate(list(self.received)), timeout_s))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
