"""End to end: the server's alerts through Debian's real Alertmanager to a webhook receiver."""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.alertmanager import AlertmanagerSink
from tests.server_support import (
    TIMEOUT,
    free_port,
    open_run,
    push,
    ready_process,
    record,
    running,
    stub_for,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
AM = Path("/usr/bin/prometheus-alertmanager")


class Receiver:
    """A webhook receiver collecting Alertmanager notifications."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        # (arrival time, path, body) of every POST, in arrival order
        self.posts: list[tuple[float, str, Any]] = []
        received, posts = self.bodies, self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(data)
                posts.append((time.time(), self.path, body))
                received.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, status: str, alertname: str, timeout: float = 30.0) -> dict[str, Any]:
        def notified() -> dict[str, Any] | None:
            for body in list(self.bodies):
                for alert in body["alerts"]:
                    if alert["status"] == status and alert["labels"]["alertname"] == alertname:
                        return dict(alert)
            return None

        found: dict[str, Any] = wait_until(
            f"a {status} {alertname} notification", notified, timeout
        )
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()
    text = (ROOT / "deploy/alertmanager/alertmanager.yml").read_text()
    assert "http://127.0.0.1:5001/alerts" in text
    config = tmp_path / "alertmanager.yml"
    config.write_text(text.replace("http://127.0.0.1:5001/alerts", receiver.url))
    port = free_port()
    command = [
        str(AM),
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        with ready_process(command, url, "alertmanager"):
            yield url, receiver
    finally:
        receiver.close()


def weakening_stream(path: list[float], first: int, seed: int) -> list[monitor_pb2.StepRecord]:
    rng = random.Random(seed)
    out = []
    for i, rho in enumerate(path, start=first):
        noisy = math.tanh(rng.gauss(math.atanh(rho), math.sqrt(1.06 / 61)))
        rec = record("run1", i, spearman=noisy, entropy=2.0)
        rec.wall_time = time.time()
        rec.inversion.n = 64
        out.append(rec)
    return out


def test_firing_then_resolved_through_alertmanager(
    tmp_path: Path, alertmanager: tuple[str, Receiver]
) -> None:
    url, receiver = alertmanager
    cfg = tmp_path / "alerts.yaml"
    cfg.write_text("resend_s: 1\nrunbook_url: https://example.invalid/runbook#{alertname}\n")
    with (
        running(tmp_path, alerts_config=cfg, alertmanager_url=url) as server,
        stub_for(server) as stub,
    ):
        open_run(stub, "run1", name="paged")
        for rec in weakening_stream([-0.5] * 80 + [-0.2] * 40, 1, seed=3):
            push(stub, rec)
        fired = receiver.wait_for("firing", "InversionWeakening")
        assert fired["labels"] == {
            "alertname": "InversionWeakening",
            "run": "paged",
            "severity": "warning",
            "service": "inversion-monitor",
        }
        annotations = fired["annotations"]
        assert annotations["runbook_url"] == "https://example.invalid/runbook#InversionWeakening"
        assert "cusum=" in annotations["description"] and "threshold" in annotations["description"]
        assert "paged" in annotations["summary"]
        # re-sent while active (resend_s = 1), and still active in Alertmanager
        sink = server._server.alertmanager  # type: ignore[attr-defined]
        assert sink is not None
        sent = sink.sent
        wait_until("two resends", lambda: sink.sent >= sent + 2, 15)
        with urllib.request.urlopen(url + "/api/v2/alerts?active=true", timeout=5) as r:
            listed = json.loads(r.read())
        assert [a["labels"]["alertname"] for a in listed] == ["InversionWeakening"]

        for rec in weakening_stream([-0.5] * 150, 121, seed=4):
            push(stub, rec)
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="paged"), timeout=TIMEOUT)
        assert not got.summary.active_alerts and len(got.alerts) == 1
        resolved = receiver.wait_for("resolved", "InversionWeakening")
        assert resolved["labels"]["run"] == "paged"


def test_sink_retries_until_alertmanager_answers(tmp_path: Path) -> None:
    """Nothing listens at first: posts fail (never raising), then succeed once it is up."""
    receiver = Receiver()
    try:
        port = free_port()
        sink = AlertmanagerSink(f"http://127.0.0.1:{port}", resend_s=0.2, timeout_s=1.0)
        try:
            sink.notify(
                "r", monitor_pb2.Alert(name="MonitorStale", severity="warning", active=True)
            )
            wait_until("two failed posts", lambda: sink.failures >= 2, 10)
            assert sink.sent == 0
        finally:
            sink.close()
        # the same sink's state, sent to a live endpoint
        live = AlertmanagerSink(receiver.url.removesuffix("/alerts"), start=False)
        live.endpoint = receiver.url
        live.notify("r", monitor_pb2.Alert(name="MonitorStale", severity="warning", active=False))
        assert live.send_once() and live.pending() == []
        assert receiver.bodies[0][0]["labels"]["alertname"] == "MonitorStale"
    finally:
        receiver.close()
