"""PostgreSQL as the store: ``--db postgresql://...`` URLs, their errors without the password,
and several servers on one database (a stream moves between them, nothing lost or doubled).

The store's behaviour on both backends is tested by the parametrised ``database``
fixture (test_server_restart, test_server_sessions, test_server_roundtrip, ...).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server.config import ServerConfig
from inversion_monitor.server.settings_file import ServerConfigError
from inversion_monitor.server.storage_state import StorageState
from inversion_monitor.server.store import Store
from inversion_monitor.server.store_errors import StreamMoved
from tests.postgres_support import PASSWORD, PASSWORD_IN_URL, PostgresCluster, TestDatabase
from tests.scripted_server import FAST, stats
from tests.server_support import (
    TIMEOUT,
    record,
    rpc_error,
    run_info,
    run_sample,
    running,
    samples,
    scrape_text,
    wait_until,
)
from tests.test_alertmanager import Receiver
from tests.test_telemetry_e2e import ServeProcess

SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"postgresql://ann:{SECRET}@db.example:port/monitor", "the port must be a number"),
        (f"postgresql://ann:{SECRET}@db.example:70000/monitor", "the port must be a number"),
        (f"postgresql://ann:{SECRET}@db.example:5432", "names no database"),
        (f"postgresql://ann:{SECRET}@:5432/monitor", "names no host"),
        (f"mysql://ann:{SECRET}@db.example/monitor", "the scheme must be postgresql://"),
        (f"postgresql://ann:{SECRET}@db.example/monitor?bogus=1", "bogus"),
        (f"postgresql://ann@db.example/monitor?password={SECRET}&x y", "white space"),
    ],
)
def test_a_bad_database_url_is_refused_naming_the_problem_not_the_password(
    url: str, problem: str
) -> None:
    for arguments, environ, source in (
        ({"db": url}, {}, "--db"),
        ({}, {"INVERSION_MONITOR_SERVER_DB": url}, "INVERSION_MONITOR_SERVER_DB"),
    ):
        with pytest.raises(ServerConfigError) as caught:
            ServerConfig.from_sources(arguments, environ)
        message = str(caught.value)
        assert message.startswith(f"invalid server configuration: {source}: ")
        assert problem in message and SECRET not in message
    # the same from code: pydantic's own error text does not echo the URL either
    with pytest.raises(ValueError) as direct:
        ServerConfig(db=url)
    assert SECRET not in str(direct.value)


def test_a_database_url_prints_without_its_password() -> None:
    url = f"postgresql://ann:{SECRET}@db.example:5432/monitor?sslmode=require"
    cfg = ServerConfig.from_sources({}, {"INVERSION_MONITOR_SERVER_DB": url})
    assert str(cfg.db) == "postgresql://ann:***@db.example:5432/monitor?sslmode=require"
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert ServerConfig(db="runs/monitor.db").db.__class__.__name__.endswith("Path")


def _serve(url: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    args = ["--db", url] if url else []
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "inversion_monitor.app.cli", "serve", *args),
            *("--grpc-address", "127.0.0.1:0", "--http-address", "off", *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_serve_with_a_wrong_password_names_the_database_and_hides_the_password(
    postgres_cluster: PostgresCluster,
) -> None:
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name, password=True).replace(PASSWORD_IN_URL, SECRET)
    proc = _serve(url)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "cannot start" in err and f"monitor_pw:***@127.0.0.1:{postgres_cluster.port}" in err
    assert "password authentication failed" in err
    assert SECRET not in out + err


@contextmanager
def _replica(url: str, *extra: str, via_env: bool) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``inversion-monitor serve`` on ``url`` (given as --db or INVERSION_MONITOR_SERVER_DB)."""
    env = {"INVERSION_MONITOR_SERVER_DB": url}
    proc = _serve("", *extra, env=env) if via_env else _serve(url, *extra)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("grpc listening on"), line + (
            proc.stderr.read() if proc.stderr else ""
        )
        yield proc, line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _push_to(stub: Any, session: str, run_id: str, *seqs: int) -> monitor_pb2.PushResponse:
    request = monitor_pb2.PushRequest(
        records=[record(run_id, s) for s in seqs], writer_session=session
    )
    response: monitor_pb2.PushResponse = stub.Push(request, timeout=TIMEOUT)
    return response


def _push(stub: Any, session: str, *seqs: int) -> monitor_pb2.PushResponse:
    return _push_to(stub, session, "moving", *seqs)


def test_two_serve_processes_share_one_database_and_a_stream_moves_between_them(
    postgres_cluster: PostgresCluster,
) -> None:
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name, password=True)  # a password URL: never printed
    database = TestDatabase("postgresql", url, postgres_cluster, name)
    with (
        _replica(url, via_env=False) as (first, target_a),
        _replica(url, via_env=True) as (second, target_b),
        grpc.insecure_channel(target_a) as channel_a,
        grpc.insecure_channel(target_b) as channel_b,
    ):
        a = monitor_pb2_grpc.MonitorServiceStub(channel_a)
        b = monitor_pb2_grpc.MonitorServiceStub(channel_b)
        info = run_info("moving", world_size=1)
        on_a = a.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
        for start in range(1, 101, 20):  # the first half to server A
            assert _push(a, on_a.writer_session, *range(start, start + 20)).accepted == 20
        # A's client fails over to B: B grants a session that continues from A's ack
        on_b = b.OpenRun(monitor_pb2.OpenRunRequest(run=info, takeover=True), timeout=TIMEOUT)
        assert on_b.acked_sequence == 100 and on_b.display_name == on_a.display_name
        # it resends what it had in flight (91..100, already stored) and goes on
        resp = _push(b, on_b.writer_session, *range(91, 121))
        assert (resp.accepted, resp.duplicates, resp.acks[0].acked_sequence) == (20, 10, 120)
        # the replaced session is refused on A as well
        err = rpc_error(
            a.Push,
            monitor_pb2.PushRequest(
                records=[record("moving", 121)], writer_session=on_a.writer_session
            ),
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "taken over" in err.details()
        # the same session back on A (whose memory is behind): the rest, none doubled
        resp = _push(a, on_b.writer_session, *range(111, 201))
        assert (resp.accepted, resp.duplicates, resp.acks[0].acked_sequence) == (80, 10, 200)
        resp = _push(b, on_b.writer_session, *range(191, 211))
        assert (resp.accepted, resp.duplicates, resp.acks[0].acked_sequence) == (10, 10, 210)
        closed = a.CloseRun(
            monitor_pb2.CloseRunRequest(run_id="moving", writer_session=on_b.writer_session),
            timeout=TIMEOUT,
        )
        assert closed.acked_sequence == 210
    for proc in (first, second):
        out, err_text = proc.communicate(timeout=30)
        assert proc.returncode == 0, err_text
        assert PASSWORD not in out + err_text and PASSWORD_IN_URL not in out + err_text
    sequences = [s for (s,) in database.rows("SELECT sequence FROM records ORDER BY sequence")]
    assert sequences == list(range(1, 211))  # every record once
    assert database.rows("SELECT records, status FROM runs") == [(210, "completed")]
    assert database.rows("SELECT acked_sequence, status FROM ranks") == [(210, "completed")]


def test_servers_on_one_postgres_database_run_together(postgres_cluster: PostgresCluster) -> None:
    """SQLite's lock file refuses a second server (test_server_storage); PostgreSQL
    takes several."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    with running(Path("unused"), db=url) as one, running(Path("unused"), db=url) as two:
        assert one.server.health() == two.server.health() == "ok"


def _sequences(database: TestDatabase) -> list[int]:
    return [s for (s,) in database.rows("SELECT sequence FROM records ORDER BY sequence")]


def test_a_replica_killed_mid_stream_loses_nothing(postgres_cluster: PostgresCluster) -> None:
    """20,000 records; server A is SIGKILLed with a push in flight; the client opens the
    stream on B (takeover), resends from B's ack, and every record is stored once."""
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name)
    database = TestDatabase("postgresql", url, postgres_cluster, name)
    total, size = 20_000, 200
    with (
        _replica(url, via_env=False) as (first, target_a),
        _replica(url, via_env=False) as (_, target_b),
        grpc.insecure_channel(target_a) as channel_a,
        grpc.insecure_channel(target_b) as channel_b,
    ):
        stub = monitor_pb2_grpc.MonitorServiceStub(channel_a)
        info = run_info("moving", world_size=1)
        session = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT).writer_session
        acked, failovers = 0, 0
        while acked < total:
            start = acked + 1
            batch = range(start, min(start + size, total + 1))
            if start > total // 2 and failovers == 0:  # kill A with this push in flight
                future = stub.Push.future(
                    monitor_pb2.PushRequest(
                        records=[record("moving", s) for s in batch], writer_session=session
                    ),
                    timeout=TIMEOUT,
                )
                first.kill()
                first.wait(timeout=30)
                with pytest.raises(grpc.RpcError):  # answered or not, it cannot be trusted
                    future.result()
            else:
                try:
                    acked = _push(stub, session, *batch).acks[0].acked_sequence
                    continue
                except grpc.RpcError:
                    pass
            failovers += 1  # the client moves to B and resumes from B's acknowledgement
            assert failovers == 1
            stub = monitor_pb2_grpc.MonitorServiceStub(channel_b)
            opened = stub.OpenRun(
                monitor_pb2.OpenRunRequest(run=info, takeover=True), timeout=TIMEOUT
            )
            session, acked = opened.writer_session, opened.acked_sequence
            assert total // 2 <= acked <= total // 2 + size
    assert _sequences(database) == list(range(1, total + 1))
    assert database.rows("SELECT records FROM runs") == [(total,)]


def test_a_postgres_restart_mid_stream_degrades_then_recovers_losing_nothing(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name, password=True)
    database = TestDatabase("postgresql", url, postgres_cluster, name)
    with running(tmp_path, db=database.target, alerts=False) as server:
        channel = grpc.insecure_channel(server.grpc_target)
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        info = run_info("moving", world_size=1)
        opened = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
        session = opened.writer_session
        assert _push(stub, session, *range(1, 101)).acks[0].acked_sequence == 100
        postgres_cluster.stop()
        try:
            err = rpc_error(
                stub.Push,
                monitor_pb2.PushRequest(
                    records=[record("moving", s) for s in range(101, 201)],
                    writer_session=session,
                ),
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "database" in err.details()
            health = server.server.health()
            assert health.startswith("degraded: ") and "monitor_pw:***@" in health
            assert PASSWORD_IN_URL not in health + err.details()
            # /metrics is served from memory and goes on
            text = scrape_text(server)
            assert run_sample(text, "inversion_monitor_step", opened.display_name) == 1000
        finally:
            postgres_cluster.start()
        wait_until("the server to recover by itself", lambda: server.server.health() == "ok")
        # the client resends what was not acknowledged
        resp = _push(stub, session, *range(101, 201))
        assert (resp.accepted, resp.acks[0].acked_sequence) == (100, 200)
        channel.close()
    assert _sequences(database) == list(range(1, 201))


def test_every_replica_shows_the_runs_written_on_the_others(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    url = postgres_cluster.url(postgres_cluster.create_database())
    with (
        running(tmp_path / "a", db=url, alerts=False) as one,
        running(tmp_path / "b", db=url, alerts=False) as two,
        grpc.insecure_channel(one.grpc_target) as channel,
    ):
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        info = run_info("elsewhere", world_size=1)
        opened = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
        _push_to(stub, opened.writer_session, "elsewhere", 1, 2, 3)

        def step_on_two() -> float | None:
            return run_sample(scrape_text(two), "inversion_monitor_step", opened.display_name)

        assert wait_until("server two to show the run", step_on_two, 20) == 30
        _push_to(stub, opened.writer_session, "elsewhere", 4)
        assert wait_until("server two to follow it", lambda: step_on_two() == 40, 20)


def test_two_servers_opening_one_new_run_at_once_conflict_without_degrading(
    postgres_cluster: PostgresCluster,
) -> None:
    """The loser of the race answers UNAVAILABLE (retry at once); the database is not
    marked failing, and the retried OpenRun finds the run the other server stored."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    one, two = Store(url), Store(url)
    try:
        with one.transaction():
            one.insert_run("same", "same", "p", b"", 1, 1.0)
        for run_id, name in (("same", "other"), ("other", "same")):
            with (
                pytest.raises(StreamMoved, match="just opened on another server"),
                two.transaction(),
            ):
                two.insert_run(run_id, name, "p", b"", 1, 2.0)
        state = StorageState()
        error = state.failed(StreamMoved("raced"))
        assert error.code == "UNAVAILABLE" and state.health() == "ok"
        assert [r.run_id for r in two.load_runs()] == ["same"]
    finally:
        one.close()
        two.close()


def test_the_client_fails_over_between_replicas_of_one_database_and_every_record_lands_once(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """The whole path of issue 28: ``MonitorClient("a,b")`` streams 20,000 records to two
    ``serve`` replicas of one PostgreSQL database; replica A is SIGKILLed mid-stream with
    records in flight; the client moves to B (its session and numbering with it) and B's
    sequence de-duplication drops what A had stored but not acknowledged."""
    name = postgres_cluster.create_database()
    database = TestDatabase("postgresql", postgres_cluster.url(name), postgres_cluster, name)
    first = ServeProcess(str(database.target)).start()
    second = ServeProcess(str(database.target)).start()
    total = 20_000
    client = MonitorClient(
        f"{first.endpoint},{second.endpoint}",
        "replicas",
        run_id="replicas",
        batch_size=200,
        spool_dir=tmp_path / "spool",
        **FAST,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            for step in range(total):
                client.log(step, stats(step), loss=1.0 / (step + 1))
                if step == total // 2:
                    wait_until("deliveries to A", lambda: client.report().delivered >= total // 4)
                    first.kill()  # SIGKILL with records in flight
            assert client.flush(timeout_s=120)
        report = client.close(timeout_s=10)
    finally:
        client.close(timeout_s=0)
        first.kill()
        second.stop()
    assert (report.logged, report.delivered, report.dropped, report.spooled) == (total, total, 0, 0)
    assert client.current_endpoint == second.endpoint and client.failovers >= 1
    rows = database.rows(
        "SELECT r.sequence, r.step FROM records r JOIN runs ON runs.pk = r.run_pk "
        "WHERE runs.run_id = ? ORDER BY r.sequence",
        ("replicas",),
    )
    assert [int(seq) for seq, _ in rows] == list(range(1, total + 1))  # one numbering, no gap
    assert [int(step) for _, step in rows] == list(range(total))  # every step once, in order


def _posted(receiver: Receiver, run: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    """``(sender, status, alert)`` for each alert of every POST the receiver got, in arrival
    order (of ``run`` only, if given). The v2 API's body is a list of alerts: firing while
    its ``endsAt`` lies after the POST arrived, resolved otherwise. ``sender``: the path
    before ``/api/v2/alerts`` (a replica's ``--alertmanager-url`` RECEIVER/a posts as ``a``)."""
    out = []
    for arrived, path, body in list(receiver.posts):
        sender = path.removesuffix("/api/v2/alerts").strip("/")
        for alert in body:
            ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")).timestamp()
            if not run or alert["labels"]["run"] == run:
                out.append((sender, "firing" if ends > arrived else "resolved", alert))
    return out


def _posts(receiver: Receiver, status: str) -> list[dict[str, Any]]:
    """Every alert of that status the receiver got."""
    return [alert for _, state, alert in _posted(receiver) if state == status]


def _alert_gauge(http_url: str, run: str) -> float | None:
    with urllib.request.urlopen(http_url + "/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    labels = (("alertname", "NonFiniteTraining"), ("run", run), ("severity", "critical"))
    return samples(text).get(("inversion_monitor_alert_active", labels))


def _rules(tmp_path: Path, resend_s: float) -> Path:
    """Detector settings of the alert tests: 3 finite records end NonFiniteTraining."""
    rules = tmp_path / "alerts.yaml"
    rules.write_text(f"resend_s: {resend_s}\nnonfinite:\n  recover: 3\n")
    return rules


@contextmanager
def _alerting_replica(
    url: str, rules: Path, receiver: Receiver, sender: str = ""
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """A ``serve`` replica with alerts (``rules``) posted to ``receiver`` (under the path
    ``/sender``) and HTTP on: ``(process, gRPC target, HTTP URL)``."""
    base = receiver.url.removesuffix("/alerts") + (f"/{sender}" if sender else "")
    flags = ("--http-address", "127.0.0.1:0", "--alerts-config", str(rules))
    with _replica(url, *flags, "--alertmanager-url", base, via_env=False) as (proc, target):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("http listening on"), line
        yield proc, target, line.split()[-1]


def _push_loss(stub: Any, session: str, run_id: str, seq: int, loss: float) -> None:
    request = monitor_pb2.PushRequest(
        records=[record(run_id, seq, loss=loss)], writer_session=session
    )
    assert stub.Push(request, timeout=TIMEOUT).accepted == 1


def test_two_replicas_share_alert_state_and_post_each_change_once(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    """An alert fired on A shows active on B (AlertSync), is not fired again when the
    stream moves to B, and B resolves it: one firing and one resolved post in all."""
    name = postgres_cluster.create_database()
    url = postgres_cluster.url(name)
    database = TestDatabase("postgresql", url, postgres_cluster, name)
    rules = _rules(tmp_path, resend_s=3600)  # posts on each change only
    receivers = {"a": Receiver(), "b": Receiver()}
    try:
        with (
            _alerting_replica(url, rules, receivers["a"]) as (_, target_a, http_a),
            _alerting_replica(url, rules, receivers["b"]) as (_, target_b, http_b),
            grpc.insecure_channel(target_a) as channel_a,
            grpc.insecure_channel(target_b) as channel_b,
        ):
            http = {"a": http_a, "b": http_b}
            a = monitor_pb2_grpc.MonitorServiceStub(channel_a)
            b = monitor_pb2_grpc.MonitorServiceStub(channel_b)
            info = run_info("diverged", world_size=1)
            on_a = a.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
            run = on_a.display_name

            def push(stub: Any, session: str, seq: int, loss: float) -> None:
                _push_loss(stub, session, "diverged", seq, loss)

            push(a, on_a.writer_session, 1, 2.0)
            push(a, on_a.writer_session, 2, math.nan)  # fires on A
            wait_until("A's firing post", lambda: _posts(receivers["a"], "firing"), 20)
            assert wait_until("B to show A's alert", lambda: _alert_gauge(http["b"], run), 20)
            assert _alert_gauge(http["a"], run) == 1.0

            on_b = b.OpenRun(monitor_pb2.OpenRunRequest(run=info, takeover=True), timeout=TIMEOUT)
            assert on_b.acked_sequence == 2
            for seq in (3, 4):  # B's detectors fire too: B adopts the stored alert
                push(b, on_b.writer_session, seq, math.nan)
            assert database.rows("SELECT count(*) FROM alerts") == [(1,)]
            for seq in (5, 6, 7):  # finite again: B ends it
                push(b, on_b.writer_session, seq, 1.5)
            wait_until("B's resolved post", lambda: _posts(receivers["b"], "resolved"), 20)
            wait_until("A to show it ended", lambda: _alert_gauge(http["a"], run) == 0.0, 20)
            assert _alert_gauge(http["b"], run) == 0.0
            assert database.rows("SELECT active, end_step, end_reason FROM alerts") == [
                (0, 70, "recovered")
            ]
        # both servers stopped: every post they made is in
        firing = {key: _posts(r, "firing") for key, r in receivers.items()}
        resolved = {key: _posts(r, "resolved") for key, r in receivers.items()}
        assert (len(firing["a"]), len(firing["b"])) == (1, 0), firing
        assert (len(resolved["a"]), len(resolved["b"])) == (0, 1), resolved
        for alert in (*firing["a"], *resolved["b"]):
            assert alert["labels"] == {
                "alertname": "NonFiniteTraining",
                "run": run,
                "severity": "critical",
                "service": "inversion-monitor",
            }
            assert alert["annotations"]["start_step"] == "20"
    finally:
        for receiver in receivers.values():
            receiver.close()
