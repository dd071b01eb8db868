"""Writer sessions, client side: one owner per (run, rank), never silent loss.

The scripted server plays the server side of the protocol (tests/scripted_server.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inversion_monitor import MonitorClient, TelemetryWarning
from tests.scripted_server import FAST, Failure, ScriptedServicer, ServerHandle, stats, wait_for
from tests.server_support import wait_until


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle = ServerHandle(ScriptedServicer(sessions=True)).start()
    yield handle
    handle.stop()


def _log(client: MonitorClient, steps: range) -> None:
    for step in steps:
        client.log(step, stats(step))


def test_the_granted_session_travels_with_every_push_and_the_close(server: ServerHandle) -> None:
    client = MonitorClient(server.endpoint, "s", run_id="s", batch_size=10, **FAST)
    _log(client, range(35))
    assert client.flush(timeout_s=10)
    report = client.close(timeout_s=5)
    assert report.delivered == 35 and report.stopped == ""
    servicer = server.servicer
    granted = servicer.writers.get(("s", 0))
    assert granted is None  # CloseRun ended it
    seen = servicer.sessions_seen
    assert [m for m, _ in seen].count("Push") >= 4 and seen[-1][0] == "CloseRun"
    assert len({session for _, session in seen}) == 1 and seen[0][1]
    assert [o.takeover for o in servicer.opens] == [False]
    assert servicer.closed[("s", 0)] == "completed"


@pytest.mark.parametrize("with_spool", [False, True])
def test_a_second_writer_is_refused_and_never_counts_records_as_delivered(
    server: ServerHandle, tmp_path: Path, with_spool: bool
) -> None:
    first = MonitorClient(server.endpoint, "dup", run_id="dup", **FAST)
    _log(first, range(10))
    assert first.flush(timeout_s=10)
    second = MonitorClient(
        server.endpoint,
        "dup",
        run_id="dup",
        spool_dir=tmp_path / "second" if with_spool else None,
        **FAST,
    )
    with pytest.warns(TelemetryWarning) as caught:
        _log(second, range(100, 120))
        # the refusal takes one OpenRun round trip (longer on a loaded machine)
        wait_until("the refusal", lambda: second.report().stopped == "ALREADY_EXISTS")
        assert not second.flush(timeout_s=5)
        report = second.close(timeout_s=1)
    halted = [str(w.message) for w in caught if "refused run dup" in str(w.message)]
    assert len(halted) == 1
    assert "ALREADY_EXISTS: run 'dup' rank 0 has a live writer" in halted[0]
    assert (report.delivered, report.stopped) == (0, "ALREADY_EXISTS")
    if with_spool:
        assert (report.spooled, report.dropped) == (20, 0)
    else:
        assert (report.spooled, report.dropped) == (0, 20)
    _log(first, range(10, 20))  # the owner is unaffected
    assert first.flush(timeout_s=10)
    assert first.close(timeout_s=5).delivered == 20
    assert server.servicer.steps("dup") == list(range(20))


def test_a_granted_open_run_whose_answer_was_lost_is_taken_over_not_refused(
    server: ServerHandle,
) -> None:
    """The server granted the first OpenRun but its answer came after the client's deadline:
    the retry finds the stream held (by this client's lost session) and takes it over once;
    nothing is lost."""
    servicer = server.servicer
    servicer.late = {"OpenRun": 1}
    client = MonitorClient(server.endpoint, "lost", run_id="lost", batch_size=10, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)  # the timeout is reported once
        _log(client, range(25))
        assert client.flush(timeout_s=30)
        report = client.close(timeout_s=5)
    assert report.delivered == 25 and report.stopped == ""
    assert [o.takeover for o in servicer.opens] == [False, False, True]
    assert servicer.steps("lost") == list(range(25))
    assert servicer.closed[("lost", 0)] == "completed"


def test_a_resumed_spool_takes_the_stream_over(tmp_path: Path) -> None:
    handle = ServerHandle(ScriptedServicer(sessions=True)).start()
    servicer = handle.servicer
    try:
        first = MonitorClient(
            handle.endpoint, "res", run_id="res", spool_dir=tmp_path, batch_size=10, **FAST
        )
        _log(first, range(10))
        assert first.flush(timeout_s=10)
        servicer.always = Failure(grpc.StatusCode.UNAVAILABLE, "down")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TelemetryWarning)
            _log(first, range(10, 30))
            report = first.close(timeout_s=0.3)  # session still live on the server
        assert report.spooled == 20
        servicer.always = None
        second = MonitorClient(handle.endpoint, "res", run_id="res", spool_dir=tmp_path, **FAST)
        _log(second, range(30, 35))
        assert second.flush(timeout_s=10)
        report = second.close(timeout_s=5)
        assert (report.replayed, report.delivered, report.stopped) == (20, 25, "")
        assert servicer.steps("res") == list(range(35))
        assert [o.takeover for o in servicer.opens] == [False, True]
        # an empty spool is no reason to take a stream over
        third = MonitorClient(handle.endpoint, "res", run_id="res", spool_dir=tmp_path, **FAST)
        third.close(timeout_s=5)
        assert servicer.opens[-1].takeover is False
    finally:
        handle.stop()


@pytest.mark.parametrize("with_spool", [False, True])
def test_a_client_whose_stream_was_taken_over_stops_and_keeps_what_is_unsent(
    server: ServerHandle, tmp_path: Path, with_spool: bool
) -> None:
    servicer = server.servicer
    client = MonitorClient(
        server.endpoint,
        "taken",
        run_id="taken",
        spool_dir=tmp_path if with_spool else None,
        **FAST,
    )
    _log(client, range(10))
    assert client.flush(timeout_s=10)
    servicer.take_over("taken")
    with pytest.warns(TelemetryWarning, match="ALREADY_EXISTS") as caught:
        _log(client, range(10, 25))
        assert not client.flush(timeout_s=5)
        report = client.close(timeout_s=1)
    assert sum("refused run taken" in str(w.message) for w in caught) == 1
    assert len(servicer.opens) == 2  # the refused Push re-opened once: ALREADY_EXISTS
    assert report.delivered == 10 and report.stopped == "ALREADY_EXISTS"
    assert (report.spooled, report.dropped) == ((15, 0) if with_spool else (0, 15))
    assert servicer.steps("taken") == list(range(10))


def test_a_session_forgotten_by_a_server_restart_is_reopened(server: ServerHandle) -> None:
    servicer = server.servicer
    client = MonitorClient(server.endpoint, "again", run_id="again", batch_size=5, **FAST)
    for round_ in range(3):  # each restart costs one re-open, every time
        _log(client, range(round_ * 10, round_ * 10 + 10))
        assert client.flush(timeout_s=10)
        servicer.forget_sessions()
    report = client.close(timeout_s=5)
    assert (report.delivered, report.stopped) == (30, "")
    assert servicer.steps("again") == list(range(30))
    assert len(servicer.opens) == 3 and not any(o.takeover for o in servicer.opens)


def test_a_session_refused_again_after_the_reopen_stops(server: ServerHandle) -> None:
    servicer = server.servicer
    client = MonitorClient(server.endpoint, "gone", run_id="gone", **FAST)
    _log(client, range(3))
    assert client.flush(timeout_s=10)
    servicer.keep_sessions = False  # every session is unknown as soon as it is granted
    servicer.forget_sessions()
    with pytest.warns(TelemetryWarning, match=r"FAILED_PRECONDITION: unknown writer session"):
        _log(client, range(3, 6))
        assert not client.flush(timeout_s=5)
    assert wait_for(lambda: client.report().stopped == "FAILED_PRECONDITION")
    assert len(servicer.opens) == 2  # re-opened once, then gave up
    report = client.close(timeout_s=1)
    assert (report.delivered, report.dropped) == (3, 3)
