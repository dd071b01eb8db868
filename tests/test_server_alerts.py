"""Server-side alerts on a real server: detectors as a listener, SQLite, /metrics, GetRun."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from pathlib import Path

import pytest

from inversion_monitor.app.cli import build_parser, main
from inversion_monitor.app.tables import runs_table
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.cli import serve_config
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.settings_file import ServerConfigError
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    close_run,
    open_run,
    promtool_check,
    push,
    record,
    running,
    samples,
    scrape_text,
    stub_for,
    wait_until,
)


def noisy(rho: float, n: int, rng: random.Random) -> float:
    return math.tanh(rng.gauss(math.atanh(rho), math.sqrt(1.06 / (n - 3))))


def stream(
    run_id: str, path: list[float], rank: int = 0, seed: int = 0
) -> list[monitor_pb2.StepRecord]:
    rng = random.Random(seed)
    recs = []
    for i, rho in enumerate(path, start=1):
        rec = record(run_id, i, rank=rank, spearman=noisy(rho, 64, rng), entropy=2.0)
        rec.inversion.n = 64
        recs.append(rec)
    return recs


def alert_gauges(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for (name, labels), value in samples(text).items():
        if name == "inversion_monitor_alert_active":
            d = dict(labels)
            out[(d["run"], d["alertname"], d["severity"])] = value
    return out


def test_weakening_fires_is_stored_exported_and_resolves(tmp_path: Path) -> None:
    db = tmp_path / "monitor.db"
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="weak")
        open_run(stub, "run1", rank=1)
        recs = stream("run1", [-0.5] * 80 + [-0.2] * 40)
        # a higher rank saying something else does not drive the detectors
        other = stream("run1", [-0.5] * 120, rank=1, seed=9)
        for i in range(0, len(recs), 20):
            push(stub, *recs[i : i + 20], *other[i : i + 20])

        got = stub.GetRun(monitor_pb2.GetRunRequest(run="weak"), timeout=TIMEOUT)
        names = [a.name for a in got.summary.active_alerts]
        assert names == ["InversionWeakening"]
        alert = got.alerts[0]
        assert alert.active and alert.severity == "warning"
        assert 81 * 10 <= alert.start_step <= 100 * 10
        assert alert.values["cusum"] > alert.values["threshold"]
        assert (
            "CUSUM" in alert.description and "-0.5" in alert.description[:60]
        ) or "rho" in alert.description

        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(), timeout=TIMEOUT)
        assert "InversionWeakening(warning)" in runs_table(listed.runs, time.time())

        text = scrape_text(server)
        assert promtool_check(text).returncode == 0
        assert alert_gauges(text) == {("weak", "InversionWeakening", "warning"): 1.0}

        rows = (
            sqlite3.connect(db)
            .execute(
                "SELECT name, severity, active, start_step, end_step, trigger_values FROM alerts"
            )
            .fetchall()
        )
        assert len(rows) == 1 and rows[0][:3] == ("InversionWeakening", "warning", 1)
        assert rows[0][3] == alert.start_step and rows[0][4] is None
        assert json.loads(rows[0][5])["cusum"] == alert.values["cusum"]

        # recovery
        back = stream("run1", [-0.5] * 150, seed=4)
        for j, rec in enumerate(back, start=121):
            rec.sequence = j
            rec.step = j * 10
        for i in range(0, len(back), 50):
            push(stub, *back[i : i + 50])
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="weak"), timeout=TIMEOUT)
        assert not got.summary.active_alerts
        assert [(a.name, a.active) for a in got.alerts] == [("InversionWeakening", False)]
        assert got.alerts[0].end_step > alert.start_step
        assert alert_gauges(scrape_text(server)) == {("weak", "InversionWeakening", "warning"): 0.0}
        row = sqlite3.connect(db).execute("SELECT active, end_step FROM alerts").fetchone()
        assert row == (0, got.alerts[0].end_step)


def test_healthy_run_has_no_alerts(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="fine")
        recs = stream("run1", [-0.5] * 300, seed=1)
        for i in range(0, len(recs), 100):
            push(stub, *recs[i : i + 100])
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="fine"), timeout=TIMEOUT)
        assert list(got.alerts) == [] and list(got.summary.active_alerts) == []
        assert alert_gauges(scrape_text(server)) == {}


def test_stale_run_alert_on_timer(tmp_path: Path) -> None:
    cfg = tmp_path / "alerts.toml"
    cfg.write_text("[stale]\nafter_s = 0.4\n")
    with running(tmp_path, alerts_config=cfg) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="quiet", world_size=1)
        push(stub, record("run1", 1))

        def active() -> list[monitor_pb2.Alert]:
            got = stub.GetRun(monitor_pb2.GetRunRequest(run="quiet"), timeout=TIMEOUT)
            return list(got.summary.active_alerts)

        alerts = wait_until("the stale alert", active, timeout_s=10)
        assert [a.name for a in alerts] == ["MonitorStale"]
        assert alerts[0].values["silent_seconds"] >= 0.4
        close_run(stub, "run1", status="completed")
        wait_until("the stale alert to end", lambda: not active(), timeout_s=10)


def test_alerts_disabled(tmp_path: Path) -> None:
    with running(tmp_path, alerts=False) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="off")
        push(stub, *stream("run1", [-0.5] * 60 + [0.3] * 30))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="off"), timeout=TIMEOUT)
        assert list(got.alerts) == []
        assert "inversion_monitor_alert_active" not in scrape_text(server)


def test_serve_flags_are_checked_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "alerts.yaml"
    bad.write_text("weakening:\n  threshold: -1\n")
    code = main(["serve", "--alerts-config", str(bad), "--db", str(tmp_path / "m.db")])
    assert code == 2
    err = capsys.readouterr().err
    assert "weakening.threshold: Input should be greater than 0" in err and str(bad) in err
    with pytest.raises(
        ServerConfigError, match="--alertmanager-url: the Alertmanager URL must start"
    ):
        ServerConfig.from_sources({"alertmanager_url": "localhost:9093"}, {})
    env = {"INVERSION_MONITOR_SERVER_ALERTMANAGER_URL": "http://127.0.0.1:9093/"}
    assert ServerConfig.from_sources({}, env).alertmanager_url == "http://127.0.0.1:9093"
    parser = build_parser()
    assert serve_config(parser.parse_args(["serve", "--no-alerts"]), {}).alerts is False
    assert serve_config(parser.parse_args(["serve"]), {}).alerts is True
    off = {"INVERSION_MONITOR_SERVER_ALERTS": "false"}
    assert serve_config(parser.parse_args(["serve"]), off).alerts is False


def test_alerts_survive_a_restart_as_history(tmp_path: Path, database: TestDatabase) -> None:
    """SQLite: one server owns the file, so a restart ends what it left active
    (``server_restart``). PostgreSQL: other replicas may still hold the run, so a
    restarted server adopts the stored active alerts: still active, not stored again."""
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="again")
        push(stub, *stream("run1", [-0.5] * 60 + [0.2] * 40))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="again"), timeout=TIMEOUT)
        before = {a.name: a for a in got.alerts}
        assert set(before) == {"InversionWeakening", "InversionLost"}
        assert all(a.active for a in before.values())
    stored = database.rows("SELECT id, name, active FROM alerts ORDER BY id")
    assert len(stored) == 2 and all(active == 1 for _, _, active in stored)
    adopted = database.postgres
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="again"), timeout=TIMEOUT)
        assert sorted(a.name for a in got.summary.active_alerts) == (
            sorted(before) if adopted else []
        )
        after = {a.name: a for a in got.alerts}
        assert set(after) == set(before)
        for name, alert in after.items():
            assert alert.active is adopted
            assert (alert.end_time > 0) is not adopted
            assert alert.start_step == before[name].start_step
            assert alert.start_time == before[name].start_time
            assert dict(alert.values) == dict(before[name].values)
        gauge = 1.0 if adopted else 0.0
        assert alert_gauges(scrape_text(server)) == {
            ("again", "InversionLost", "critical"): gauge,
            ("again", "InversionWeakening", "warning"): gauge,
        }
        reasons = database.rows("SELECT DISTINCT end_reason FROM alerts")
        assert reasons == ([(None,)] if adopted else [("server_restart",)])
        # the same two rows: nothing stored again
        rows = database.rows("SELECT id, name, active FROM alerts ORDER BY id")
        assert [(i, n) for i, n, _ in rows] == [(i, n) for i, n, _ in stored]
        assert [a for _, _, a in rows] == ([1, 1] if adopted else [0, 0])


def test_runs_past_retention_leave_the_alert_gauge_and_stop_being_stale(tmp_path: Path) -> None:
    cfg = tmp_path / "alerts.toml"
    cfg.write_text("[stale]\nafter_s = 0.3\n")
    # the gauge shows from ~0.3 s (stale) until 3 s (retention): a wide window for a busy machine
    with running(tmp_path, alerts_config=cfg, retention=3.0) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="gone", world_size=1)
        push(stub, record("run1", 1))

        def stale_alerts() -> list[tuple[str, bool]]:
            got = stub.GetRun(monitor_pb2.GetRunRequest(run="gone"), timeout=TIMEOUT)
            return [(a.name, a.active) for a in got.alerts]

        gauges = wait_until(
            "the stale alert on the gauge", lambda: alert_gauges(scrape_text(server)), 10
        )
        assert gauges == {("gone", "MonitorStale", "warning"): 1.0}
        # past retention the run leaves the gauge and its alert ends; the two happen on
        # different timers (scrape vs. stale check), so wait for both conditions
        wait_until(
            "the run to leave the gauge and its alert to end",
            lambda: (
                not alert_gauges(scrape_text(server))
                and stale_alerts() == [("MonitorStale", False)]
            ),
            10,
        )
