"""deploy/prometheus/prometheus-replicas.yml live: a real Prometheus scrapes two servers
that both export the same run, fires the forwarded detector alert once per replica, and
a real Alertmanager holds it as one alert (``instance`` is dropped from alerts)."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path
from typing import Any

from tests.server_support import open_run, push, running, stub_for
from tests.server_support import wait_until as wait
from tests.test_alertmanager import (
    Receiver,
    alertmanager,  # noqa: F401 - the fixture
)
from tests.test_deploy_prometheus import RUN, api, records, running_prometheus

ROOT = Path(__file__).resolve().parent.parent


def _am_alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/api/v2/alerts", timeout=10) as response:
        alerts: list[dict[str, Any]] = json.loads(response.read())
    return [a for a in alerts if a["labels"].get("alertname") == "InversionMonitorDetector"]


def test_two_replicas_one_alert_in_alertmanager(
    tmp_path: Path,
    alertmanager: tuple[str, Receiver],  # noqa: F811 - the imported fixture
) -> None:
    am_url, _receiver = alertmanager
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running(tmp_path / "a") as first,
        running(tmp_path / "b") as second,
        stub_for(first) as stub_a,
        stub_for(second) as stub_b,
    ):
        for stub in (stub_a, stub_b):  # the same run on both, as a shared store shows it
            open_run(stub, "run1", name=RUN, kind="rl")
            push(stub, *records(1, 100, -0.5, random.Random(5)))  # GradNormSpike at 70
        targets = [s.http_url.removeprefix("http://") for s in (first, second) if s.http_url]
        text = (ROOT / "deploy/prometheus/prometheus-replicas.yml").read_text()
        replaced = {
            '["monitor-a:9464", "monitor-b:9464"]': json.dumps(targets),
            '["alertmanager:9093"]': json.dumps([am_url.removeprefix("http://")]),
            "scrape_interval: 15s": "scrape_interval: 1s",
            "evaluation_interval: 15s": "evaluation_interval: 1s",
        }
        for old, new in replaced.items():
            assert old in text, old
            text = text.replace(old, new)
        with running_prometheus(tmp_path, text) as base:

            def firing_per_replica() -> list[dict[str, Any]]:
                alerts = api(base, "alerts")["alerts"]
                spikes = [
                    a
                    for a in alerts
                    if a["labels"].get("detector") == "GradNormSpike" and a["state"] == "firing"
                ]
                return spikes if len(spikes) == 2 else []

            spikes = wait("GradNormSpike firing from both replicas", firing_per_replica, 60)
            assert sorted(a["labels"]["instance"] for a in spikes) == sorted(targets)

            def held_by_alertmanager() -> list[dict[str, Any]]:
                return [a for a in _am_alerts(am_url) if a["labels"]["detector"] == "GradNormSpike"]

            def both_sent() -> bool:  # Prometheus's own counter of alerts sent
                with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
                    text = response.read().decode()
                sent = [
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("prometheus_notifications_sent_total{")
                ]
                return sum(sent) >= 2

            wait("Prometheus to send both copies", both_sent, 60)
            (held,) = wait("the alert in Alertmanager", held_by_alertmanager, 60)
            assert "instance" not in held["labels"]
            assert held["labels"]["run"] == spikes[0]["labels"]["run"]
