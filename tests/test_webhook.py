"""The demo's alert receiver fed by the server's real Alertmanager sink over loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from inversion_monitor.app.webhook import AlertReceiver
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.alertmanager import AlertmanagerSink


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    got = AlertReceiver().start()
    try:
        yield got
    finally:
        got.stop()


def _alert(active: bool, step: int = 34) -> monitor_pb2.Alert:
    return monitor_pb2.Alert(
        name="EntropyCollapse",
        severity="warning",
        active=active,
        start_step=step,
        end_step=0 if active else step + 5,
        start_time=1000.0,
        end_time=0.0 if active else 1010.0,
        summary="Entropy collapse",
        description=f"smoothed mean entropy 0.4 nats < 0.5 x early level 1.2 at step {step}",
        values={"entropy_mean": 0.4},
    )


def test_a_firing_alert_arrives_once_with_its_step(receiver: AlertReceiver) -> None:
    sink = AlertmanagerSink(receiver.url, resend_s=0.2)
    try:
        sink.notify("demo-rl-lr-x100", _alert(active=True))
        assert receiver.wait(lambda got: len(got) == 1, timeout_s=10)
        # re-sent every resend_s by the sink, received once
        assert receiver.wait(lambda got: receiver.posts >= 3, timeout_s=10)
    finally:
        sink.close()
    (alert,) = receiver.take()
    assert receiver.take() == []
    assert alert.line() == (
        "EntropyCollapse (warning) on run demo-rl-lr-x100 at step 34: "
        "smoothed mean entropy 0.4 nats < 0.5 x early level 1.2 at step 34"
    )


def test_a_resolved_alert_is_not_announced(receiver: AlertReceiver) -> None:
    sink = AlertmanagerSink(receiver.url, resend_s=30)
    try:
        sink.notify("demo-rl", _alert(active=False))
        assert sink.send_once()
    finally:
        sink.close()
    assert receiver.posts >= 1 and receiver.received == []


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/api/v2/alerts", {"labels": {}}, 400, "expected a JSON list of alerts"),
        ("/api/v2/alerts", [{"labels": {"alertname": "X"}}], 400, "malformed alert"),
        ("/elsewhere", [], 404, "post alerts to /api/v2/alerts"),
    ],
)
def test_bad_posts_are_refused_with_the_reason(
    receiver: AlertReceiver, path: str, body: object, status: int, reason: str
) -> None:
    request = urllib.request.Request(
        receiver.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == status
    assert reason in refused.value.read().decode()
    assert receiver.received == []
