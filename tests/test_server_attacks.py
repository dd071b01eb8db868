"""Attacks on a real server on loopback (issue 26): each stays fixed.

Every request's CPU, memory and time is bounded, a slow one never stalls the
others, bad input is INVALID_ARGUMENT / 400, and scopes hide other projects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import select
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from inversion_monitor.app.cli import main
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import Limits, MonitorServer
from inversion_monitor.server.auth import TokenScope
from inversion_monitor.server.entropy_law import EntropyLawMonitor
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    close_run,
    config,
    open_run,
    push,
    push_request,
    record,
    rpc_error,
    run_info,
    running,
    samples,
    scrape_text,
    session,
    stub_for,
    wait_until,
)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------- 1. a config string


def test_a_long_config_value_is_redacted_in_linear_time(tmp_path: Path) -> None:
    # each of these made the backtracking regexes take seconds, with the server frozen
    values = ["a" * 65_000, "x://b:" + "c" * 65_000, "-eyJ" * 16_000]
    with running(tmp_path) as server, stub_for(server) as stub:
        for i, value in enumerate(values):
            info = run_info(f"long{i}", name=f"long {i}", config_json=json.dumps({"v": value}))
            # a deadline far above the milliseconds it takes, far below the seconds it took
            stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=3.0)
        assert _get(server.http_url + "/healthz")[0] == 200
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="long0"), timeout=TIMEOUT)
        assert json.loads(got.summary.run.config_json) == {"v": values[0]}
    # a restart redacts every stored run again: as fast
    start = time.monotonic()
    with running(tmp_path) as server:
        assert len(server.ingestor.views) == len(values)
    assert time.monotonic() - start < 10.0


# ---------------------------------------------------------------- 6. bad input


def test_deeply_nested_config_json_is_invalid_argument(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        for depth in (65, 500, 20_000):
            deep = '{"a": ' + "[" * depth + "]" * depth + "}"
            err = rpc_error(
                stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("deep", config_json=deep))
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "config_json" in err.details() and len(err.details()) < 200
        # a config nested a little is fine
        fine = json.dumps({"a": {"b": [[1, 2], {"c": None}]}})
        open_run(stub, "shallow", config_json=fine)


def test_a_non_ascii_digit_in_a_query_is_400(tmp_path: Path) -> None:
    with running(tmp_path) as server:
        for query in ("/api/runs?limit=%C2%B2", "/api/runs/x?history=%D9%A3"):
            status, body = _get(server.http_url + query)
            assert status == 400, (query, body)
            assert json.loads(body)["error"]["code"] == "INVALID_ARGUMENT"


class _Failing:
    """A listener that raises a different error on each record."""

    def __init__(self) -> None:
        self.calls = 0

    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        self.calls += 1
        raise (ValueError if self.calls == 1 else KeyError)(f"failure {self.calls}")


def test_every_kind_of_listener_error_is_logged(tmp_path: Path, caplog) -> None:
    server = MonitorServer(config(tmp_path), listeners=[_Failing()]).start()
    try:
        with caplog.at_level(logging.ERROR, "inversion_monitor.server"), stub_for(server) as stub:
            open_run(stub, "r1")
            push(stub, record("r1", 1))
            push(stub, record("r1", 2))
    finally:
        server.stop()
    failed = [r for r in caplog.records if "ingest listener" in r.getMessage()]
    assert [r.exc_info[0] for r in failed if r.exc_info] == [ValueError, KeyError]


# ---------------------------------------------------------------- 7. nested secrets


def test_a_key_naming_a_secret_redacts_its_whole_value(tmp_path: Path) -> None:
    secrets = {
        "db_password": {"prod": "hunter2-prod", "dev": ["hunter2-dev"]},
        "password": 12345678,
        "auth": {"pw": "opensesame"},
        "token_samples": 64,  # an LM setting, not a secret
    }
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "leaky", name="leaky", config_json=json.dumps(secrets))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="leaky"), timeout=TIMEOUT)
    assert json.loads(got.summary.run.config_json) == {
        "db_password": "[redacted]",
        "password": "[redacted]",
        "auth": "[redacted]",
        "token_samples": 64,
    }
    raw = (tmp_path / "monitor.db").read_bytes()
    for secret in (b"hunter2", b"12345678", b"opensesame"):
        assert secret not in raw


# ---------------------------------------------------------------- 5. names and scopes


def test_a_final_newline_does_not_pass_for_a_valid_name(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run1\n")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "run_id" in err.details()
        info = run_info("run2", labels={"team\n": "a"})
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=info))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels" in err.details()


# ---------------------------------------------------------------- 2. idle HTTP connections


def _idle_connections(server: MonitorServer, count: int) -> list[socket.socket]:
    assert server.http_url is not None
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=TIMEOUT) for _ in range(count)]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (a 503 or nothing, then end of stream)."""
    sock.settimeout(0.05)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_idle_http_connections_are_closed_and_leave_grpc_and_healthz_alone(
    tmp_path: Path,
) -> None:
    limits = Limits(http_timeout_s=1.0, http_connection_max_s=30.0)
    with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        idle = _idle_connections(server, 60)
        try:
            assert _get(server.http_url + "/healthz")[0] == 200
            open_run(stub, "r1")
            assert push(stub, record("r1", 1)).accepted == 1
            # a connection that never sends a byte is closed after http_timeout_s
            for sock in idle:
                wait_until("the idle connection to be closed", lambda s=sock: _closed_by_server(s))
        finally:
            for sock in idle:
                sock.close()


def test_connections_past_the_cap_are_refused_at_once(tmp_path: Path) -> None:
    limits = Limits(max_http_connections=4, http_timeout_s=2.0)
    with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        idle = _idle_connections(server, 4)
        extra = _idle_connections(server, 6)
        try:
            for sock in extra:  # long before the timeout: refused, the descriptor freed
                sock.settimeout(1.0)
                assert sock.recv(100).startswith(b"HTTP/1.0 503")
            open_run(stub, "r1")
            assert push(stub, record("r1", 1)).accepted == 1
            for sock in idle:
                wait_until("the idle connection to be closed", lambda s=sock: _closed_by_server(s))
            assert _get(server.http_url + "/healthz")[0] == 200
        finally:
            for sock in idle + extra:
                sock.close()


def test_a_trickling_connection_is_cut_after_its_lifetime(tmp_path: Path) -> None:
    limits = Limits(http_timeout_s=1.0, http_connection_max_s=2.0)
    with running(tmp_path, limits=limits) as server:
        (sock,) = _idle_connections(server, 1)
        try:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.0\r\n")
            closed = False
            while not closed and time.monotonic() - started < 15:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")  # a header line every 0.3 s, never the end
                # pace the trickle: wait up to 0.25 s for the server to close the socket
                select.select([sock], [], [], 0.25)
                closed = _closed_by_server(sock)
            assert closed, "the trickling connection stayed open"
        finally:
            sock.close()


# ---------------------------------------------------------------- 3. history memory


def _sampled(run_id: str, sequence: int, count: int) -> monitor_pb2.StepRecord:
    rec = record(run_id, sequence)
    for j in range(count):
        rec.samples.add(entropy=1.0 + j / count, score=0.5, token_id=j)
    return rec


def test_history_is_capped_in_bytes_newest_first(
    tmp_path: Path, database: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = Limits(max_history_bytes=160 * 1024)
    with (
        running(tmp_path, db=database.target, limits=limits) as server,
        stub_for(server) as stub,
    ):
        open_run(stub, "big", name="big")
        for seq in range(1, 41):
            push(stub, _sampled("big", seq, 1000))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="big", history_limit=40), timeout=TIMEOUT)
        steps = [r.step for r in got.history]
        assert 0 < len(steps) < 40 and steps == list(range(410 - 10 * len(steps), 410, 10))
        assert sum(r.ByteSize() for r in got.history) <= 160 * 1024
        assert got.summary.records == 40
        assert got.truncated and got.max_bytes == 160 * 1024  # the answer says it was cut
        # what fits is not cut
        small = stub.GetRun(monitor_pb2.GetRunRequest(run="big", history_limit=3), timeout=TIMEOUT)
        assert len(small.history) == 3 and not small.truncated
        # the page leaves the samples out: then every record fits, streamed as valid JSON
        status, body = _get(server.http_url + "/api/runs/big?history=40&samples=0")
        assert status == 200
        data = json.loads(body)
        assert [int(r["step"]) for r in data["history"]] == list(range(10, 410, 10))
        assert all(r["samples"] == [] for r in data["history"])
        assert data["summary"]["display_name"] == "big"
        assert data["truncated"] is False and data["max_bytes"] == str(20 * 1024)
        # with samples, JSON gets an eighth of the cap (20 KiB: one record of 13 KB)
        url = server.http_url + "/api/runs/big?history=40"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            assert resp.headers["X-Truncated"] == "true"
            data = json.loads(resp.read())
        assert [int(r["step"]) for r in data["history"]] == [400]
        assert data["truncated"] is True and data["max_bytes"] == str(20 * 1024)
        with urllib.request.urlopen(url + "&samples=0", timeout=TIMEOUT) as resp:
            assert resp.headers["X-Truncated"] == "false"
        # the CLI says so in one line, naming the cap and how to see more
        capsys.readouterr()
        assert main(["show", "big", "--limit", "40", "--endpoint", server.grpc_target]) == 0
        out = capsys.readouterr().out
        note = f"truncated: {len(steps)} of the 40 records asked for fit the server's byte cap"
        assert out.count("truncated:") == 1 and note + " (160 KiB)" in out
        assert "ask for fewer (--limit N), or raise the server's max_history_bytes" in out
        assert main(["show", "big", "--limit", "3", "--endpoint", server.grpc_target]) == 0
        assert "truncated" not in capsys.readouterr().out


def test_list_runs_is_capped_under_the_byte_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = Limits(max_history_bytes=16 * 1024)
    with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        for i in range(30):
            open_run(stub, f"r{i:02d}", name=f"r{i:02d}", config_json=json.dumps({"x": "y" * 2000}))
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(limit=1000), timeout=TIMEOUT)
        assert 0 < len(listed.runs) < 30 and listed.ByteSize() <= 16 * 1024 + 100
        assert listed.runs[0].display_name == "r29"  # the newest first
        assert listed.truncated and listed.max_bytes == 16 * 1024
        few = stub.ListRuns(monitor_pb2.ListRunsRequest(limit=2), timeout=TIMEOUT)
        assert len(few.runs) == 2 and not few.truncated
        with urllib.request.urlopen(server.http_url + "/api/runs", timeout=TIMEOUT) as resp:
            assert resp.headers["X-Truncated"] == "true"
            data = json.loads(resp.read())
        assert data["truncated"] is True and data["max_bytes"] == str(16 * 1024)
        with urllib.request.urlopen(server.http_url + "/api/runs?limit=2", timeout=TIMEOUT) as resp:
            assert resp.headers["X-Truncated"] == "false"
            assert json.loads(resp.read())["truncated"] is False
        capsys.readouterr()
        assert main(["runs", "--limit", "30", "--endpoint", server.grpc_target]) == 0
        out = capsys.readouterr().out
        note = f"truncated: {len(listed.runs)} of the 30 runs asked for fit the server's byte cap"
        assert out.count("truncated:") == 1 and note + " (16 KiB)" in out
        assert "(--limit N, --project P)" in out
        assert main(["runs", "--limit", "2", "--endpoint", server.grpc_target]) == 0
        assert "truncated" not in capsys.readouterr().out


# ---------------------------------------------------------------- 4. concurrent calls


class _Gate:
    """A listener that holds the writer thread until released (a slow disk, say)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        self.entered.set()
        self.release.wait(TIMEOUT)


def test_push_bytes_in_flight_are_bounded(tmp_path: Path) -> None:
    gate = _Gate()
    limits = Limits(max_inflight_push_bytes=64 * 1024)
    server = MonitorServer(config(tmp_path, limits=limits), listeners=[gate]).start()
    try:
        with stub_for(server) as stub:
            open_run(stub, "a")
            open_run(stub, "b")
            held = stub.Push.future(push_request(stub, _sampled("a", 1, 4000)), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            err = rpc_error(stub.Push, push_request(stub, _sampled("b", 1, 4000)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_push_bytes" in err.details()
            gate.release.set()
            assert held.result().accepted == 1
            assert push(stub, _sampled("b", 1, 4000)).accepted == 1  # room again
    finally:
        gate.release.set()
        server.stop()


def test_concurrent_calls_are_bounded(tmp_path: Path) -> None:
    gate = _Gate()
    limits = Limits(max_concurrent_rpcs=2)
    server = MonitorServer(config(tmp_path, limits=limits), listeners=[gate]).start()
    try:
        with stub_for(server) as stub:
            open_run(stub, "a")
            open_run(stub, "b")
            first = stub.Push.future(push_request(stub, record("a", 1)), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            second = stub.Push.future(push_request(stub, record("b", 1)), timeout=TIMEOUT)
            wait_until(
                "both pushes in flight",
                lambda: (
                    samples(scrape_text(server))[("inversion_monitor_writer_queue_depth", ())] == 2
                ),
            )
            # two calls in flight: a third is turned away
            err = _refused(stub.ListRuns, monitor_pb2.ListRunsRequest())
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.release.set()
            assert first.result().accepted == 1 and second.result().accepted == 1
    finally:
        gate.release.set()
        server.stop()


def _refused(call: Any, request: Any) -> grpc.RpcError | None:
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc
    return None


# ---------------------------------------------------------------- 5. Host and /metrics


def test_a_tokenless_api_answers_only_known_hosts(tmp_path: Path) -> None:
    with running(tmp_path, allowed_hosts=("monitor.lan",)) as server:
        port = server.http_port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"monitor.lan:{port}", "[::1]"):
            assert _get(server.http_url + "/api/runs", {"Host": host})[0] == 200, host
        status, body = _get(server.http_url + "/api/runs", {"Host": f"evil.example:{port}"})
        assert status == 403 and b"allowed-host" in body
        assert _get(server.http_url + "/healthz", {"Host": "evil.example"})[0] == 200
    with running(tmp_path, tokens=["t0ken"]) as server:  # tokens guard it instead
        headers = {"Host": "evil.example", "Authorization": "Bearer t0ken"}
        assert _get(server.http_url + "/api/runs", headers)[0] == 200


def test_metrics_can_require_a_token_reading_every_project(tmp_path: Path) -> None:
    scopes = (TokenScope(token="team-a", projects=("a",), access="read-only"),)
    with (
        running(tmp_path, tokens=["full"], scoped_tokens=scopes, metrics_token=True) as server,
        stub_for(server, token="full") as stub,
    ):
        open_run(stub, "r1", name="secret-project-run")
        url = server.http_url + "/metrics"
        assert _get(url)[0] == 401
        assert _get(url, {"Authorization": "Bearer team-a"})[0] == 401
        status, body = _get(url, {"Authorization": "Bearer full"})
        assert status == 200 and b"secret-project-run" in body
    with pytest.raises(ValueError, match="metrics_token needs tokens"):
        config(tmp_path, metrics_token=True)


def _scoped_server(tmp_path: Path) -> Any:
    scopes = (
        TokenScope(token="team-a", projects=("a", "a-secret-project")),
        TokenScope(token="team-b", projects=("b",)),
    )
    return running(tmp_path, tokens=["full"], scoped_tokens=scopes)


def test_a_name_resolves_within_the_callers_projects(tmp_path: Path) -> None:
    with _scoped_server(tmp_path) as server:
        with stub_for(server, token="team-a") as a:
            open_run(a, "a-run-id", name="shared-name", project="a")
        with stub_for(server, token="team-b") as b:
            # a decoy: project b's run id is project a's display name
            open_run(b, "shared-name", name="decoy", project="b")
            # and a display name equal to an existing run id is never given
            opened = open_run(b, "b2", name="a-run-id", project="b")
            assert opened.display_name != "a-run-id"
        for token in ("team-a", "full"):
            with stub_for(server, token=token) as stub:
                got = stub.GetRun(monitor_pb2.GetRunRequest(run="shared-name"), timeout=TIMEOUT)
                assert got.summary.run.run_id == "a-run-id", token
        with stub_for(server, token="team-b") as stub:
            got = stub.GetRun(monitor_pb2.GetRunRequest(run="shared-name"), timeout=TIMEOUT)
            assert got.summary.run.run_id == "shared-name"


def test_another_projects_run_looks_unknown(tmp_path: Path) -> None:
    with _scoped_server(tmp_path) as server:
        with stub_for(server, token="team-a") as a:
            open_run(a, "secret-run", project="a-secret-project")
        with stub_for(server, token="team-b") as b:
            unknown = monitor_pb2.CloseRunRequest(run_id="no-such-run", writer_session="x" * 32)
            other = monitor_pb2.CloseRunRequest(run_id="secret-run", writer_session="x" * 32)
            err_unknown, err_other = rpc_error(b.CloseRun, unknown), rpc_error(b.CloseRun, other)
            assert err_unknown.code() == err_other.code() == grpc.StatusCode.NOT_FOUND
            assert err_other.details() == err_unknown.details().replace("no-such-run", "secret-run")
            err = rpc_error(
                b.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("secret-run", project="b"))
            )
            assert "a-secret-project" not in err.details()
            for call in (b.GetRun, b.ListRuns):
                request = (
                    monitor_pb2.GetRunRequest(run="secret-run")
                    if call is b.GetRun
                    else monitor_pb2.ListRunsRequest()
                )
                try:
                    answer = call(request, timeout=TIMEOUT)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    assert "a-secret-project" not in exc.details()
                else:
                    assert "secret" not in str(answer)


def test_push_and_close_are_refused_after_the_ranks_close(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "r1", world_size=2)
        assert push(stub, record("r1", 1)).accepted == 1
        close_run(stub, "r1", status="completed")
        err = rpc_error(stub.Push, push_request(stub, record("r1", 2)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in err.details()
        request = monitor_pb2.CloseRunRequest(
            run_id="r1", rank=0, status="failed", writer_session=session(stub, "r1", 0)
        )
        err = rpc_error(stub.CloseRun, request)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="r1"), timeout=TIMEOUT)
        assert got.summary.records == 1
        # OpenRun re-opens the stream for writing
        open_run(stub, "r1", world_size=2)
        assert push(stub, record("r1", 2)).accepted == 1


# ---------------------------------------------------------------- 4. memory over days of runs


def test_runs_past_retention_leave_memory_and_come_back_on_demand(tmp_path: Path) -> None:
    limits = Limits(max_active_runs=3)
    with running(tmp_path, limits=limits, retention="1s") as server, stub_for(server) as stub:
        for round_no in range(4):
            for i in range(3):
                run_id = f"r{round_no}-{i}"
                request = monitor_pb2.OpenRunRequest(run=run_info(run_id, name=run_id))
                wait_until(  # the previous round ages out of the retention window
                    "room for a run", lambda r=request: _refused(stub.OpenRun, r) is None
                )
                open_run(stub, run_id, name=run_id, world_size=1)
                push(stub, record(run_id, 1))
        # every run ages out and leaves memory; only the database holds them
        wait_until("the runs pruned from memory", lambda: not server.ingestor.views)
        listed = stub.ListRuns(monitor_pb2.ListRunsRequest(limit=100), timeout=TIMEOUT)
        assert len(listed.runs) == 12 and listed.runs[0].display_name == "r3-2"
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="r0-0"), timeout=TIMEOUT)
        assert [r.step for r in got.history] == [10]
        wait_until("the runs pruned again", lambda: not server.ingestor.views)
        # a writer whose run was pruned goes on with its session
        health_only = record("r3-2", 2, spearman=None, entropy=None, loss=1.0)
        assert push(stub, health_only).acks[0].acked_sequence == 2
        wait_until("the run pruned again", lambda: not server.ingestor.views)
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="r3-2"), timeout=TIMEOUT)
        assert got.summary.records == 2
        # read back, its latest view keeps the last probe's inversion fields
        assert (got.summary.latest.step, got.summary.latest.loss) == (20, 1.0)
        assert got.summary.latest.inversion.spearman.value == -0.5
        # a new run never takes a pruned run's name
        assert open_run(stub, "new", name="r0-0", world_size=1).display_name == "r0-0-2"


def test_the_alert_engine_follows_the_runs_in_memory(tmp_path: Path) -> None:
    limits = Limits(max_active_runs=3)
    with running(tmp_path, limits=limits, retention="1s") as server, stub_for(server) as stub:
        engine = server.server.alerts
        assert engine is not None
        for round_no in range(3):
            for i in range(3):
                run_id = f"r{round_no}-{i}"
                request = monitor_pb2.OpenRunRequest(run=run_info(run_id, name=run_id))
                wait_until("room for a run", lambda r=request: _refused(stub.OpenRun, r) is None)
                open_run(stub, run_id, name=run_id, world_size=1)
                push(stub, record(run_id, 1, grad_norm=math.inf))
                assert [a.name for a in engine.active(run_id)] == ["NonFiniteTraining"]
        # the engine drops what it holds of each run that leaves memory
        wait_until(
            "the runs and their alert state pruned",
            lambda: not server.ingestor.views and engine.run_count() == 0,
        )
        with contextlib.closing(sqlite3.connect(tmp_path / "monitor.db")) as conn:
            ends = conn.execute("SELECT active, end_reason FROM alerts").fetchall()
        assert ends == [(0, "run_closed")] * 9  # their active alerts ended as they left
        # read back, a run shows its stored alerts, none active: its detectors start afresh
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="r0-0"), timeout=TIMEOUT)
        assert [(a.name, a.active) for a in got.alerts] == [("NonFiniteTraining", False)]
        assert engine.active("r0-0") == []
        # a pruned run's writer goes on: the condition fires again, once
        push(stub, record("r2-2", 2, grad_norm=math.inf))
        push(stub, record("r2-2", 3, grad_norm=math.inf))
        got = stub.GetRun(monitor_pb2.GetRunRequest(run="r2-2"), timeout=TIMEOUT)
        assert [(a.name, a.active) for a in got.alerts] == [
            ("NonFiniteTraining", False),
            ("NonFiniteTraining", True),
        ]
        assert [a.start_step for a in engine.active("r2-2")] == [20]


def test_the_entropy_law_makes_room_for_new_runs() -> None:
    law = EntropyLawMonitor(max_runs=2)
    for run_id in ("old-1", "old-2", "new"):
        for step in range(40):
            h = 0.02 + 1.5 * math.exp(-step / 20)
            rec = monitor_pb2.StepRecord(
                step=step, policy_entropy_mean=h, reward_mean=-0.4 * math.exp(h) + 1.2
            )
            law.on_record(run_id, run_id, rec)
    assert set(law.snapshot()) == {"old-2", "new"}
