"""Writer sessions on a real server with raw gRPC stubs: one owner per (run, rank) stream."""

from __future__ import annotations

from pathlib import Path

import grpc

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from tests.postgres_support import TestDatabase
from tests.server_support import (
    TIMEOUT,
    record,
    rpc_error,
    run_info,
    running,
    stub_for,
    wait_until,
)


def _open(
    stub: monitor_pb2_grpc.MonitorServiceStub,
    run_id: str = "run1",
    rank: int = 0,
    *,
    takeover: bool = False,
) -> monitor_pb2.OpenRunResponse:
    request = monitor_pb2.OpenRunRequest(run=run_info(run_id), rank=rank, takeover=takeover)
    response: monitor_pb2.OpenRunResponse = stub.OpenRun(request, timeout=TIMEOUT)
    return response


def _push(
    stub: monitor_pb2_grpc.MonitorServiceStub, session: str, *records: monitor_pb2.StepRecord
) -> monitor_pb2.PushResponse:
    request = monitor_pb2.PushRequest(records=list(records), writer_session=session)
    response: monitor_pb2.PushResponse = stub.Push(request, timeout=TIMEOUT)
    return response


def _stored(database: TestDatabase) -> list[tuple[int, int]]:
    return database.rows("SELECT rank, sequence FROM records ORDER BY rank, sequence")


def test_a_second_writer_is_refused_by_name_and_the_first_loses_nothing(
    tmp_path: Path, database: TestDatabase
) -> None:
    with (
        running(tmp_path, db=database.target) as server,
        stub_for(server) as first,
        stub_for(server) as second,
    ):
        owner = _open(first)
        assert len(owner.writer_session) >= 32  # >= 128 bits, URL-safe text
        _push(first, owner.writer_session, record("run1", 1), record("run1", 2))

        err = rpc_error(second.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run1"), rank=0))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        details = err.details()
        assert "'run1' rank 0" in details and "use another run_id or rank" in details
        assert "same spool_dir takes the stream over" in details

        # a second writer cannot write into the stream with a session of its own stream
        other = _open(second, "run1", rank=1)
        err = rpc_error(
            second.Push,
            monitor_pb2.PushRequest(
                records=[record("run1", 3)], writer_session=other.writer_session
            ),
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "records[0] is for run 'run1' rank 0" in err.details()
        # nor without a session, nor with a made-up one, nor close it
        for token in ("", "not-a-session"):
            err = rpc_error(
                second.Push,
                monitor_pb2.PushRequest(records=[record("run1", 3)], writer_session=token),
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'run1' rank 0" in err.details() and "re-opened" in err.details()
            err = rpc_error(
                second.CloseRun,
                monitor_pb2.CloseRunRequest(run_id="run1", rank=0, writer_session=token),
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

        # the owner's next records are stored, none counted as duplicates
        resp = _push(first, owner.writer_session, record("run1", 3), record("run1", 4))
        assert (resp.accepted, resp.duplicates, resp.acks[0].acked_sequence) == (2, 0, 4)
    assert _stored(database) == [(0, 1), (0, 2), (0, 3), (0, 4)]


def test_takeover_invalidates_the_previous_session(tmp_path: Path, database: TestDatabase) -> None:
    with (
        running(tmp_path, db=database.target) as server,
        stub_for(server) as old,
        stub_for(server) as new,
    ):
        before = _open(old)
        _push(old, before.writer_session, record("run1", 1))
        after = _open(new, takeover=True)
        assert after.writer_session != before.writer_session
        assert after.acked_sequence == 1  # the resumed writer continues from the ack

        err = rpc_error(
            old.Push,
            monitor_pb2.PushRequest(
                records=[record("run1", 2)], writer_session=before.writer_session
            ),
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == "run run1 rank 0 was taken over by another writer"
        err = rpc_error(
            old.CloseRun,
            monitor_pb2.CloseRunRequest(
                run_id="run1", rank=0, writer_session=before.writer_session
            ),
        )
        assert err.details() == "run run1 rank 0 was taken over by another writer"

        assert _push(new, after.writer_session, record("run1", 2)).accepted == 1
        closed = new.CloseRun(
            monitor_pb2.CloseRunRequest(run_id="run1", rank=0, writer_session=after.writer_session),
            timeout=TIMEOUT,
        )
        assert closed.acked_sequence == 2


def test_an_idle_or_closed_session_is_replaced_without_takeover(tmp_path: Path) -> None:
    with running(tmp_path, writer_idle_timeout="0.5s") as server, stub_for(server) as stub:
        idle = _open(stub, "run1")
        _push(stub, idle.writer_session, record("run1", 1))
        assert rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run1"))).code() == (
            grpc.StatusCode.ALREADY_EXISTS
        )

        def reopened() -> monitor_pb2.OpenRunResponse | None:
            try:
                return _open(stub, "run1")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
                return None

        # free once idle for longer than writer_idle_timeout
        fresh = wait_until("the idle session to be released", reopened, TIMEOUT)
        assert fresh.acked_sequence == 1
        err = rpc_error(
            stub.Push,
            monitor_pb2.PushRequest(
                records=[record("run1", 2)], writer_session=idle.writer_session
            ),
        )
        assert "taken over" in err.details()

    (tmp_path / "closed").mkdir()
    with running(tmp_path / "closed") as server, stub_for(server) as stub:
        done = _open(stub, "run2")
        stub.CloseRun(
            monitor_pb2.CloseRunRequest(run_id="run2", rank=0, writer_session=done.writer_session),
            timeout=TIMEOUT,
        )
        assert _open(stub, "run2").writer_session != done.writer_session  # closed: free


def test_sessions_survive_a_restart_and_are_stored_as_digests(
    tmp_path: Path, database: TestDatabase
) -> None:
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        owner = _open(stub)
        _push(stub, owner.writer_session, record("run1", 1))
    with running(tmp_path, db=database.target) as server, stub_for(server) as stub:
        # the writer goes on with its session; a second writer is still refused
        assert _push(stub, owner.writer_session, record("run1", 2)).acks[0].acked_sequence == 2
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=run_info("run1")))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    if not database.postgres:
        assert owner.writer_session.encode() not in Path(database.target).read_bytes()
    ((digest, previous),) = database.rows("SELECT session, previous_session FROM ranks")
    assert len(digest) == 64 and owner.writer_session not in (digest, previous)  # sha256 hex


def test_an_empty_push_without_a_session_is_a_no_op(tmp_path: Path) -> None:
    with running(tmp_path) as server, stub_for(server) as stub:
        assert _push(stub, "").acks == []
