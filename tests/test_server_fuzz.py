"""Fuzz the server: every request gets a status or is accepted and sanitised; it stays up."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import TIMEOUT, config, promtool_check, samples, scrape_text

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server import Limits, MonitorServer

RUN_IDS = ["fuzz-a", "fuzz-b"]
METHODS = ("OpenRun", "Push", "CloseRun", "ListRuns", "GetRun")
# what a well-formed but hostile message may get; never INTERNAL or UNKNOWN
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
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
                stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)
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


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 1 + 1e-12, -1.5, 1e308, -1e-300]
)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def step_records(draw):
    rec = monitor_pb2.StepRecord(
        run_id=draw(st.sampled_from(RUN_IDS) | st.text(max_size=70)),
        rank=draw(st.integers(0, 6) | u32),
        sequence=draw(st.integers(0, 40) | st.integers(0, 2**64 - 1)),
        step=draw(st.integers(-(2**63), 2**63 - 1)),
        wall_time=draw(floats),
    )
    if draw(st.booleans()):
        for corr in (rec.inversion.spearman, rec.inversion.pearson):
            for name in ("value", "ci_low", "ci_high"):
                if draw(st.booleans()):
                    setattr(corr, name, draw(floats))
        rec.inversion.n = draw(u32)
        rec.inversion.confidence = draw(floats)
        rec.inversion.insufficient_reason = draw(st.text(max_size=300))
    for summary in (rec.entropy, rec.score):
        for name in ("mean", "p10", "p50", "p90"):
            if draw(st.booleans()):
                setattr(summary, name, draw(floats))
    for name in ("loss", "learning_rate", "probe_seconds", "spearman_per_token_type"):
        if draw(st.booleans()):
            setattr(rec, name, draw(floats))
    for _ in range(draw(st.integers(0, 10))):
        rec.components.add(
            layer=draw(u32),
            projection=draw(st.sampled_from(["q", "k", "v", "o", "", "qq"])),
            spearman=draw(floats),
            score_mean=draw(floats),
        )
    for _ in range(draw(st.integers(0, 10))):
        rec.samples.add(entropy=draw(f32), score=draw(f32), token_id=draw(u32))
    return rec


@SETTINGS
@given(records=st.lists(step_records(), max_size=24))
def test_structured_push_fuzz(server, channel, records):
    stub = monitor_pb2_grpc.MonitorServiceStub(channel)
    try:
        resp = stub.Push(monitor_pb2.PushRequest(records=records), timeout=TIMEOUT)
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
        stub.OpenRun(monitor_pb2.OpenRunRequest(run=info), timeout=TIMEOUT)


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
