"""A client with several endpoints: the list is checked at the boundary, the client fails
over when its endpoint is unreachable, and its records, spool and writer session follow it.

Two real gRPC servers on loopback share one scripted store (a :class:`ScriptedServicer`
behind two ports: replicas of one database) or run as ``inversion-monitor serve`` on
separate SQLite files (``tests/test_failover_serve.py``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from inversion_monitor.app.run_command import check_settings
from inversion_monitor.config import MonitorConfig, MonitorConfigError
from tests.scripted_server import FAST, Failure, ScriptedServicer, ServerHandle, stats
from tests.server_support import free_port, wait_until

BAD_LISTS = [
    ("127.0.0.1:1,,127.0.0.1:2", "entry 2 is empty: separate the servers by single commas"),
    ("127.0.0.1:1,monitor-b", "entry 'monitor-b' has no port: write it as 'monitor-b:PORT'"),
    ("127.0.0.1:1,127.0.0.1:1", "entry 2 ('127.0.0.1:1') repeats entry 1: name each server once"),
    ("a:1,http://b:2", "entry 'http://b:2' looks like a URL"),
    ("a:1,b:99999", "port '99999' is not a number from 1 to 65535"),
    ("a:1,::1", "IPv6 address without brackets: write it as '[ADDRESS]:PORT'"),
    ("a:1,", "entry 2 is empty"),
]


@pytest.fixture
def shared() -> Iterator[tuple[ScriptedServicer, ServerHandle, ServerHandle]]:
    """Two servers on two ports over one store with writer sessions (two replicas)."""
    store = ScriptedServicer(sessions=True)
    first, second = ServerHandle(store).start(), ServerHandle(store).start()
    try:
        yield store, first, second
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize(("endpoint", "problem"), BAD_LISTS)
def test_a_bad_endpoint_list_is_refused_naming_the_entry_and_the_fix(
    endpoint: str, problem: str
) -> None:
    with pytest.raises(ValueError, match="endpoint=") as raised:
        MonitorClient(endpoint, "bad")
    assert problem in str(raised.value)
    with pytest.raises(MonitorConfigError) as config_error:
        MonitorConfig(endpoint=endpoint)
    assert config_error.value.problems[0][0] == "endpoint"
    assert problem in str(config_error.value)


def test_the_endpoint_list_is_one_knob_from_code_environment_and_the_run_command() -> None:
    assert MonitorConfig(endpoint=" a:1 , b:2 ").endpoint == "a:1,b:2"
    assert MonitorConfig(endpoint=["a:1", "dns:///b:2"]).endpoint == "a:1,dns:///b:2"
    assert MonitorConfig(endpoint="").endpoint is None  # no server, as before
    env = {"INVERSION_MONITOR_ENDPOINT": "a:1,b:2"}
    assert MonitorConfig.from_env(env).endpoint == "a:1,b:2"
    assert MonitorConfig.from_env({"INVERSION_MONITOR_ENDPOINT": '["a:1", "b:2"]'}).endpoint == (
        "a:1,b:2"
    )
    client = MonitorClient(["127.0.0.1:9", "127.0.0.1:10"], "list", close_timeout_s=0.0)
    try:
        assert client.endpoints == ("127.0.0.1:9", "127.0.0.1:10")
        assert client.endpoint == "127.0.0.1:9,127.0.0.1:10"
    finally:
        client.close(timeout_s=0)

    problem = check_settings(argparse.Namespace(endpoint="a:1,a:1"), {})
    assert problem is not None and problem.startswith("--endpoint: ")
    assert "repeats entry 1: name each server once" in problem
    problem = check_settings(argparse.Namespace(), {"INVERSION_MONITOR_ENDPOINT": "a:1,b"})
    assert problem is not None and problem.startswith("the variable INVERSION_MONITOR_ENDPOINT")


def test_the_first_endpoint_down_at_start_sends_everything_to_the_second() -> None:
    second = ServerHandle(ScriptedServicer(sessions=True)).start()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", TelemetryWarning)  # a failover is no outage
            client = MonitorClient(
                f"{dead},{second.endpoint}", "first down", run_id="down", batch_size=10, **FAST
            )
            for step in range(100):
                client.log(step, stats(step))
            assert client.flush(timeout_s=30)
            report = client.close(timeout_s=5)
        assert (report.delivered, report.dropped) == (100, 0)
        assert second.servicer.steps("down") == list(range(100))
        assert second.servicer.sequences("down") == list(range(1, 101))
        assert client.current_endpoint == second.endpoint
        assert client.failovers == 1
        # straight to the second: no backoff before an endpoint not yet tried
        assert len(second.servicer.call_log("OpenRun")) == 1
    finally:
        second.stop()


def test_a_replica_lost_mid_stream_moves_the_stream_with_its_session(
    shared: tuple[ScriptedServicer, ServerHandle, ServerHandle],
) -> None:
    store, first, second = shared
    total = 3000
    client = MonitorClient(
        f"{first.endpoint},{second.endpoint}", "replicas", run_id="moved", batch_size=50, **FAST
    )
    slowest_log = 0.0
    try:
        for step in range(total):
            started = time.perf_counter()
            client.log(step, stats(step))
            slowest_log = max(slowest_log, time.perf_counter() - started)
            if step == 1000:
                wait_until("deliveries through the first", lambda: store.acked("moved") >= 500)
                first.stop()  # the first replica is gone; the store stays
        assert client.flush(timeout_s=30)
        report = client.close(timeout_s=5)
    finally:
        client.close(timeout_s=0)
    assert (report.logged, report.delivered, report.dropped) == (total, total, 0)
    assert store.steps("moved") == list(range(total))  # each once, in order, no gap
    assert client.current_endpoint == second.endpoint
    assert client.failovers == 1
    # the replica honoured the session of the first: no re-open, no takeover
    assert [o.takeover for o in store.opens] == [False]
    assert len({session for _, session in store.sessions_seen}) == 1
    assert store.closed[("moved", 0)] == "completed"
    assert slowest_log < 0.5  # log() never waits for the failover


def test_after_failover_a_replica_refusing_the_session_is_taken_over_once(
    shared: tuple[ScriptedServicer, ServerHandle, ServerHandle],
) -> None:
    """The second replica does not know the session (e.g. sessions kept per replica):
    FAILED_PRECONDITION re-opens the run, the store still sees the first session live
    (ALREADY_EXISTS), and the client takes its own stream over, once."""
    store, first, second = shared
    client = MonitorClient(
        f"{first.endpoint},{second.endpoint}", "replicas", run_id="taken", batch_size=10, **FAST
    )
    try:
        for step in range(100):
            client.log(step, stats(step))
        assert client.flush(timeout_s=30)
        first.stop()
        store.fail_next(
            Failure(grpc.StatusCode.FAILED_PRECONDITION, "unknown session"), method="Push"
        )
        for step in range(100, 200):
            client.log(step, stats(step))
        assert client.flush(timeout_s=30)
        report = client.close(timeout_s=5)
    finally:
        client.close(timeout_s=0)
    assert (report.delivered, report.dropped, report.stopped) == (200, 0, "")
    assert store.steps("taken") == list(range(200))
    assert [o.takeover for o in store.opens] == [False, False, True]


def test_another_writer_is_not_taken_over_without_a_failover(
    shared: tuple[ScriptedServicer, ServerHandle, ServerHandle],
) -> None:
    """ALREADY_EXISTS on a client that never failed over stops it, as before."""
    store, first, second = shared
    store.take_over("busy")  # another live writer holds the stream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        client = MonitorClient(f"{first.endpoint},{second.endpoint}", "busy", run_id="busy", **FAST)
        client.log(1, stats(1))
        assert not client.flush(timeout_s=10)
        report = client.close(timeout_s=1)
    assert report.stopped == "ALREADY_EXISTS"
    assert [o.takeover for o in store.opens] == [False]


def test_with_every_endpoint_down_the_client_alternates_and_backs_off_per_round() -> None:
    down = Failure(grpc.StatusCode.UNAVAILABLE, "draining")
    servers = [ServerHandle(ScriptedServicer(always=down)).start() for _ in range(2)]
    backoff = 0.2
    options = {**FAST, "backoff_initial_s": backoff, "backoff_max_s": backoff}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)
        client = MonitorClient(",".join(s.endpoint for s in servers), "down", **options)  # type: ignore[arg-type]
        try:
            client.log(1, stats(1))
            wait_until("three rounds", lambda: len(servers[1].servicer.call_log()) >= 3)
        finally:
            client.close(timeout_s=0)
            for server in servers:
                server.stop()
    calls = sorted(
        (call.time, index) for index, s in enumerate(servers) for call in s.servicer.call_log()
    )
    assert [index for _, index in calls[:6]] == [0, 1, 0, 1, 0, 1]  # round-robin
    # between rounds (second -> first) the jittered backoff: at least 0.8 * backoff
    gaps = [calls[i + 1][0] - calls[i][0] for i in (1, 3)]
    assert min(gaps) >= 0.8 * backoff - 0.01, gaps
    assert any("any of" in message for message in client.warnings)  # names every endpoint
