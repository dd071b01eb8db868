"""Fuzz the server: every request gets a status or is accepted and sanitised; it stays up."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import Limits, MonitorServer
from tests.server_support import (
    RUN_IDS,
    TIMEOUT,
    config,
    promtool_check,
    samples,
    scrape_text,
    step_records,
    u32,
)

METHODS = ("OpenRun", "Push", "CloseRun", "ListRuns", "GetRun")
# what a well-formed but hostile message may get; never INTERNAL or UNKNOWN
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}
# run_id -> the writer session of its rank 0 (the fixture's, renewed by takeover)
SESSIONS: dict[str, str] = {}
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    limits = Limits(max_records_per_push=20, max_samples=8, max_components=8, max_labels=4)
    with MonitorServer(config(tmp, limits=limits)) as srv:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = monitor_pb2_grpc.MonitorServiceStub(ch)
            for run_id in RUN_IDS:
                info = monitor_pb2.RunInfo(run_id=run_id, name=run_id, world_size=4)
                opened = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
                SESSIONS[run_id] = opened.writer_session
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def _assert_healthy(server, channel):
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=TIMEOUT
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    text = scrape_text(server)
    assert not any(math.isnan(v) or math.isinf(v) for v in samples(text).values())


@SETTINGS
@given(
    records=st.lists(step_records(), max_size=24),
    own_stream=st.integers(0, 3),
    session=st.sampled_from(RUN_IDS) | st.text(max_size=40),
)
def test_structured_push_fuzz(server, channel, records, own_stream, session):
    stub = monitor_pb2_grpc.MonitorServiceStub(channel)
    token = SESSIONS.get(session, session)
    if own_stream and session in SESSIONS:  # mostly records of the session's own stream
        for rec in records:
            rec.run_id, rec.rank = session, 0
    try:
        resp = stub.Push(
            monitor_pb2.PushRequest(records=records, writer_session=token), timeout=TIMEOUT
        )
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
        return
    assert resp.accepted + resp.duplicates + len(resp.rejected) == len(records)
    for rejected in resp.rejected:
        assert rejected.field.startswith("records[") and rejected.reason


@SETTINGS
@given(
    call=st.fixed_dictionaries(
        {
            "run_id": st.sampled_from(RUN_IDS) | st.text(max_size=70),
            "rank": u32,
            "status": st.sampled_from(["", "completed", "failed", "interrupted", "bogus"]),
        }
    ),
    info=st.fixed_dictionaries(
        {
            "name": st.text(max_size=300),
            "labels": st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=6),
            "world_size": u32,
            "config_json": st.sampled_from(["", "{}", '{"a": 1}', "[1]", "{", "null"]),
        }
    ),
)
def test_structured_open_close_fuzz(server, channel, call, info):
    stub = monitor_pb2_grpc.MonitorServiceStub(channel)
    run_id, rank, status = call["run_id"], call["rank"], call["status"]
    name = info["name"]
    info = monitor_pb2.RunInfo(run_id=run_id, **info)
    calls = [
        (stub.OpenRun, monitor_pb2.OpenRunRequest(run=info, rank=rank)),
        (stub.CloseRun, monitor_pb2.CloseRunRequest(run_id=run_id, rank=rank, status=status)),
        (stub.GetRun, monitor_pb2.GetRunRequest(run=run_id, history_limit=rank % 20_000)),
        (stub.ListRuns, monitor_pb2.ListRunsRequest(project=name, limit=rank % 20_000)),
    ]
    for method, request in calls:
        try:
            method(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
    # reopen the fixed runs in case the example closed them
    if run_id in RUN_IDS:
        info = monitor_pb2.RunInfo(run_id=run_id, world_size=4)
        opened = stub.OpenRun(monitor_pb2.OpenRunRequest(run=info, takeover=True), timeout=TIMEOUT)
        SESSIONS[run_id] = opened.writer_session


@SETTINGS
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=2048))
def test_random_bytes_to_raw_methods(server, channel, method, payload):
    call = channel.unary_unary(f"/inversion_monitor.v1.MonitorService/{method}")
    try:
        call(payload, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        # bytes that are not protobuf: INVALID_ARGUMENT, not UNKNOWN or INTERNAL
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())


def test_server_is_up_and_metrics_are_valid_after_fuzzing(server, channel):
    # runs last in this module (pytest keeps file order)
    _assert_healthy(server, channel)
    checked = promtool_check(scrape_text(server))
    assert checked.returncode == 0, checked.stderr
