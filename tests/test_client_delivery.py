"""MonitorClient against a real loopback gRPC server: delivery, acks, resends."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from tests.scripted_server import FAST, Failure, ScriptedServicer, ServerHandle, stats, wait_for


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle = ServerHandle().start()
    yield handle
    handle.stop()


def test_delivers_every_record_once_in_order(server: ServerHandle) -> None:
    client = MonitorClient(
        server.endpoint,
        "order",
        run_id="order",
        batch_size=100,
        project="p",
        labels={"team": "a"},
        config={"probe_every": 10},
        **FAST,
    )
    for step in range(1200):
        client.log(step, stats(step), loss=1.0 / (step + 1), learning_rate=1e-4)
    assert client.flush(timeout_s=20)
    report = client.close(timeout_s=5)
    servicer = server.servicer
    assert servicer.sequences("order") == list(range(1, 1201))
    assert servicer.steps("order") == list(range(1200))
    assert max(servicer.received.values()) == 1
    assert (report.logged, report.delivered, report.dropped, report.spooled) == (1200, 1200, 0, 0)
    assert report.complete and report.pending == 0
    assert servicer.closed[("order", 0)] == "completed"
    assert client.display_name == "order-shown"
    run = servicer.runs["order"]
    assert (run.project, dict(run.labels), run.config_json) == (
        "p",
        {"team": "a"},
        '{"probe_every": 10}',
    )
    # batches were used: far fewer pushes than records, none larger than batch_size
    pushes = servicer.call_log("Push")
    assert len(pushes) < 100 and max(c.records for c in pushes) <= 100


def test_flush_close_idempotent_and_log_after_close(server: ServerHandle) -> None:
    client = MonitorClient(server.endpoint, "idem", run_id="idem", **FAST)
    assert client.flush(timeout_s=1)  # nothing logged: trivially acknowledged
    for step in range(10):
        client.log(step, stats(step))
    assert client.flush(timeout_s=10)
    assert client.flush(timeout_s=10)
    first = client.close(timeout_s=5)
    assert client.close(timeout_s=5) is first
    with pytest.warns(TelemetryWarning, match="closed client"):
        client.log(10, stats(10))
    assert client.close() is first
    assert client.report().dropped == 0  # the final report does not change
    assert server.servicer.sequences("idem") == list(range(1, 11))


def test_context_manager_reports_failure_status(server: ServerHandle) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        MonitorClient(server.endpoint, "ctx", run_id="ctx", **FAST) as client,
    ):
        client.log(0, stats(0))
        raise RuntimeError("boom")
    assert server.servicer.closed[("ctx", 0)] == "failed"
    assert server.servicer.sequences("ctx") == [1]


def test_rejected_records_are_counted_warned_once_and_never_resent(server: ServerHandle) -> None:
    server.servicer.reject = lambda r: ("records[].step", "odd") if r.step % 2 else None
    client = MonitorClient(server.endpoint, "rej", run_id="rej", batch_size=7, **FAST)
    with pytest.warns(TelemetryWarning, match="rejected records for good") as caught:
        for step in range(40):
            client.log(step, stats(step))
        assert client.flush(timeout_s=10)
    assert sum("rejected" in str(w.message) for w in caught) == 1
    report = client.close(timeout_s=5)
    assert (report.delivered, report.rejected, report.dropped) == (20, 20, 0)
    assert server.servicer.steps("rej") == list(range(0, 40, 2))
    assert max(server.servicer.received.values()) == 1


def test_not_found_reopens_the_run_and_resends(server: ServerHandle) -> None:
    servicer = server.servicer
    client = MonitorClient(server.endpoint, "nf", run_id="nf", **FAST)
    for step in range(30):
        client.log(step, stats(step))
    assert client.flush(timeout_s=10)
    # a NOT_FOUND that is not a state loss: re-open, resend, nothing lost
    servicer.fail_next(Failure(grpc.StatusCode.NOT_FOUND, "no such run"), method="Push")
    for step in range(30, 60):
        client.log(step, stats(step))
    assert client.flush(timeout_s=10)
    assert servicer.steps("nf") == list(range(60))
    opens = len(servicer.call_log("OpenRun"))
    assert opens >= 2
    # the server loses its database: the client re-opens and numbers from 1 again
    servicer.lose_state()
    for step in range(60, 90):
        client.log(step, stats(step))
    assert client.flush(timeout_s=10)
    assert servicer.sequences("nf") == list(range(1, 31))
    assert servicer.steps("nf") == list(range(60, 90))
    assert client.close(timeout_s=5).delivered == 90


def test_server_restart_resends_without_gaps_or_duplicates(server: ServerHandle) -> None:
    servicer = server.servicer
    client = MonitorClient(server.endpoint, "restart", run_id="restart", batch_size=50, **FAST)
    for step in range(200):
        client.log(step, stats(step))
    assert wait_for(lambda: servicer.acked("restart") > 0)
    server.stop()  # same servicer state survives: a restart on the same database
    for step in range(200, 400):
        client.log(step, stats(step))
    assert not client.flush(timeout_s=0.3)
    server.restart()
    for step in range(400, 500):
        client.log(step, stats(step))
    assert client.flush(timeout_s=20)
    report = client.close(timeout_s=5)
    assert servicer.sequences("restart") == list(range(1, 501))
    assert servicer.steps("restart") == list(range(500))
    assert report.delivered == 500 and report.dropped == 0


def test_reply_lost_after_store_is_not_stored_twice() -> None:
    """The server stores a batch but the client's deadline expires first."""
    handle = ServerHandle(ScriptedServicer(delay_s=0.6, delay_method="Push")).start()
    try:
        client = MonitorClient(
            handle.endpoint, "late", run_id="late", **{**FAST, "rpc_timeout_s": 0.3}
        )
        for step in range(20):
            client.log(step, stats(step))
        assert wait_for(lambda: len(handle.servicer.call_log("Push")) >= 1)
        assert wait_for(lambda: handle.servicer.sequences("late") == list(range(1, 21)))
        handle.servicer.delay_s = 0.0
        assert client.flush(timeout_s=10)
        report = client.close(timeout_s=5)
        assert handle.servicer.steps("late") == list(range(20))
        assert report.delivered == 20
        assert max(handle.servicer.received.values()) >= 2  # it was resent, stored once
    finally:
        handle.stop()


def test_token_is_sent_as_bearer_metadata() -> None:
    handle = ServerHandle(ScriptedServicer(token="s3cret")).start()
    try:
        client = MonitorClient(handle.endpoint, "auth", run_id="auth", token="s3cret", **FAST)
        client.log(0, stats(0))
        assert client.flush(timeout_s=10)
        client.close(timeout_s=5)
        assert handle.servicer.sequences("auth") == [1]
    finally:
        handle.stop()


def test_dns_endpoint_form(server: ServerHandle) -> None:
    client = MonitorClient(f"dns:///{server.endpoint}", "dns", run_id="dns", **FAST)
    client.log(0, stats(0))
    assert client.flush(timeout_s=10)
    client.close(timeout_s=5)
    assert server.servicer.sequences("dns") == [1]


def test_ranks_are_numbered_independently(server: ServerHandle) -> None:
    clients = [
        MonitorClient(server.endpoint, "ddp", run_id="ddp", rank=r, world_size=2, **FAST)
        for r in range(2)
    ]
    for step in range(25):
        for c in clients:
            c.log(step, stats(step))
    for c in clients:
        assert c.flush(timeout_s=10)
        c.close(timeout_s=5)
    for rank in range(2):
        assert server.servicer.sequences("ddp", rank) == list(range(1, 26))
