"""Bad input: partial success, whole-request errors and every limit with its status."""

from __future__ import annotations

import math
import sqlite3
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given, settings

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import Limits, MonitorServer
from inversion_monitor.server.validate import RecordProblem, check_record, check_record_slow
from tests.server_support import (
    ODD_TARGETS,
    TIMEOUT,
    acks,
    close_run,
    config,
    inject,
    open_run,
    plausible_records,
    push,
    push_request,
    record,
    rpc_error,
    run_info,
    running,
    samples,
    scrape_text,
    session,
    step_records,
    stub_for,
    wait_until,
)


def _retry_delay(err: grpc.RpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status details"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


def test_partial_success_rejects_bad_records_and_stores_the_rest(tmp_path):
    with running(tmp_path, limits=Limits(max_samples=4)) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        open_run(stub, "run1", rank=1)
        batch = [record("run1", s) for s in range(1, 12)]
        batch[1].inversion.spearman.value = math.nan  # stored as missing
        batch[1].loss = math.inf  # a health value: kept, and named by the server
        batch[2].step = -5
        batch[3].inversion.spearman.value = 1.5
        batch[4].entropy.mean = -1.0
        batch[5].components.add(layer=0, projection="x")
        for _ in range(5):
            batch[6].samples.add(entropy=1.0, score=1.0)
        batch[7].samples.add(entropy=math.nan, score=1.0)  # dropped, record kept
        batch[7].samples.add(entropy=1.0, score=2.0, token_id=9)
        batch[8].wall_time = -3.0
        batch[9].inversion.spearman.value = 1.0 + 1e-9  # round-off: clamped to 1
        batch.append(record("run1", 0, rank=1))  # sequences start at 1
        resp = push(stub, *batch)

        rejected = {(r.field, r.rank, r.sequence): r.reason for r in resp.rejected}
        assert set(rejected) == {
            ("records[2].step", 0, 3),
            ("records[3].inversion.spearman.value", 0, 4),
            ("records[4].entropy.mean", 0, 5),
            ("records[5].components[0].projection", 0, 6),
            ("records[6].samples", 0, 7),
            ("records[8].wall_time", 0, 9),
            ("records[11].sequence", 1, 0),
        }
        assert rejected["records[2].step", 0, 3].startswith("out_of_range: step is -5")
        assert "max_samples is 4" in rejected["records[6].samples", 0, 7]
        assert resp.accepted == 5 and resp.duplicates == 0
        # rejected sequences count as done: the ack passes them, nothing is resent
        assert acks(resp) == {("run1", 0): 11, ("run1", 1): 0}

        history = stub.GetRun(monitor_pb2.GetRunRequest(run="run1"), timeout=TIMEOUT).history
        by_seq = {r.sequence: r for r in history if r.rank == 0}
        assert sorted(by_seq) == [1, 2, 8, 10, 11]
        assert not by_seq[2].inversion.spearman.HasField("value")
        assert by_seq[2].loss == math.inf and list(by_seq[2].nonfinite_fields) == ["loss"]
        assert [(s.entropy, s.token_id) for s in by_seq[8].samples] == [(1.0, 9)]
        assert by_seq[10].inversion.spearman.value == 1.0

        s = samples(scrape_text(server))
        rejected_total = "inversion_monitor_records_rejected_total"
        assert s[(rejected_total, (("reason", "out_of_range"),))] == 4
        assert s[(rejected_total, (("reason", "malformed"),))] == 1
        assert s[(rejected_total, (("reason", "too_large"),))] == 1
        # every reason is a series from the start (a rank outside world_size cannot even open)
        reasons = {dict(labels)["reason"] for name, labels in s if name == rejected_total}
        assert reasons == {"out_of_range", "malformed", "too_large", "bad_sequence"}
        assert s[(rejected_total, (("reason", "bad_sequence"),))] == 1
        assert s[("inversion_monitor_nonfinite_values_total", ())] == 2
        # a resend of a rejected record is a duplicate, never stored
        again = push(stub, batch[2])
        assert (again.accepted, again.duplicates, len(again.rejected)) == (0, 1, 0)
    with sqlite3.connect(tmp_path / "monitor.db") as conn:
        assert conn.execute("SELECT count(*) FROM rejected").fetchone() == (6,)


def test_push_outside_its_session_stream_fails_as_a_whole(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        token = session(stub, "run1", 0)
        for other in (record("ghost", 1), record("run1", 1, rank=1)):
            request = monitor_pb2.PushRequest(
                records=[record("run1", 1), other], writer_session=token
            )
            err = rpc_error(stub.Push, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "records[1]" in err.details() and "'run1' rank 0" in err.details()
        err = rpc_error(stub.Push, monitor_pb2.PushRequest(records=[record("bad id!", 1)]))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no writer_session" in err.details() and "re-opened" in err.details()
        # nothing of the failed pushes was stored
        assert acks(push(stub, record("run1", 1))) == {("run1", 0): 1}
        assert push(stub).acks == []  # an empty push is fine


def test_sequence_far_ahead_is_rejected_without_moving_the_ack(tmp_path):
    with running(tmp_path, limits=Limits(max_sequence_gap=100)) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        resp = push(stub, record("run1", 1), record("run1", 500))
        assert [r.field for r in resp.rejected] == ["records[1].sequence"]
        assert "max_sequence_gap=100" in resp.rejected[0].reason
        assert acks(resp) == {("run1", 0): 1}


def test_limits_answer_with_the_right_status_and_name_the_limit(tmp_path):
    limits = Limits(
        max_records_per_push=5,
        max_message_bytes=4096,
        max_active_runs=2,
        max_labels=2,
        max_label_value_length=8,
    )
    with running(tmp_path, limits=limits) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        err = rpc_error(stub.Push, monitor_pb2.PushRequest(records=[record("run1", 1)] * 6))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_records_per_push is 5" in err.details()

        big = record("run1", 1)
        for _ in range(400):
            big.samples.add(entropy=1.0, score=1.0, token_id=123456)
        err = rpc_error(stub.Push, monitor_pb2.PushRequest(records=[big]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.details() and "4096" in err.details()

        def open_err(info: monitor_pb2.RunInfo, rank: int = 0) -> grpc.RpcError:
            return rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest(run=info, rank=rank))

        err = open_err(run_info("run9", labels={"a": "1", "b": "2", "c": "3"}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_labels is 2" in err.details()
        err = open_err(run_info("run9", labels={"a": "x" * 9}))
        assert "max_label_value_length is 8" in err.details()
        err = open_err(run_info("run9", labels={"bad-key": "1"}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad-key" in err.details()
        err = open_err(run_info("run 9"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "run.run_id" in err.details()
        err = open_err(run_info("run9", world_size=2), rank=2)
        assert "world_size" in err.details()
        err = open_err(run_info("run9", config_json="[1, 2]"))
        assert "run.config_json must be a JSON object" in err.details()
        err = rpc_error(stub.OpenRun, monitor_pb2.OpenRunRequest())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "run is missing" in err.details()

        open_run(stub, "run2")
        err = open_err(run_info("run3"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_active_runs=2" in err.details()
        assert _retry_delay(err) == 30.0
        open_run(stub, "run1", rank=1)  # existing runs may still open more ranks
        for rank in (0, 1):
            close_run(stub, "run1", rank=rank)
        # a closed run still counts until it leaves the retention window
        err = open_err(run_info("run3"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class _Gate:
    """A listener that holds the writer thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.steps: list[int] = []

    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        self.steps.append(rec.step)
        self.entered.set()
        assert self.release.wait(TIMEOUT)


class _Broken:
    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        raise RuntimeError("detector bug")


def test_listeners_see_stored_records_and_overload_is_shed_with_retry_info(tmp_path):
    gate = _Gate()
    cfg = config(tmp_path, limits=Limits(max_pending_pushes=1))
    with MonitorServer(cfg, listeners=[_Broken(), gate]) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        first = stub.Push.future(push_request(stub, record("run1", 1, step=7)), timeout=TIMEOUT)
        assert gate.entered.wait(TIMEOUT)
        err = rpc_error(stub.Push, push_request(stub, record("run1", 2)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_pending_pushes=1" in err.details()
        assert _retry_delay(err) == 0.25
        gate.release.set()
        assert first.result().accepted == 1  # the broken listener did not fail the push
        assert gate.steps == [7]
        assert push(stub, record("run1", 2, step=8)).accepted == 1
        assert gate.steps == [7, 8]
        s = samples(scrape_text(server))
        assert s[("inversion_monitor_listener_errors_total", ())] == 2


class _Runs:
    """A run listener: the (run_id, kind) of each on_run_open, in order; the pruned run ids."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, str]] = []
        self.pruned: list[str] = []

    def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
        pass

    def on_run_open(self, run_id: str, display_name: str, info: monitor_pb2.RunInfo) -> None:
        self.opened.append((run_id, info.kind))

    def on_run_pruned(self, run_id: str) -> None:
        self.pruned.append(run_id)


def test_run_listeners_learn_each_run_once_when_it_opens_and_again_at_restart(tmp_path):
    first = _Runs()
    with MonitorServer(config(tmp_path), listeners=[first]) as server, stub_for(server) as stub:
        open_run(stub, "rl-run", kind="rl", world_size=2)
        open_run(stub, "rl-run", rank=1, kind="rl", world_size=2)  # the same run: no new event
        open_run(stub, "sft-run", kind="sft")
        assert first.opened == [("rl-run", "rl"), ("sft-run", "sft")]
    again = _Runs()
    with MonitorServer(config(tmp_path), listeners=[again]):
        assert sorted(again.opened) == [("rl-run", "rl"), ("sft-run", "sft")]


@settings(max_examples=400, deadline=None)
@given(rec=plausible_records() | step_records())
def test_fast_path_agrees_with_field_by_field_reference(rec):
    """``check_record`` (fast path first) and ``check_record_slow`` give identical results."""
    limits = Limits(max_components=4, max_samples=4)
    assert _outcome(check_record, rec, limits) == _outcome(check_record_slow, rec, limits)


def _outcome(check, rec, limits):
    copy = monitor_pb2.StepRecord()
    copy.CopyFrom(rec)
    try:
        result: object = check(copy, limits, 123.0)
    except RecordProblem as exc:
        result = (exc.field, exc.reason, exc.message)
    return result, copy.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [(path, field, value) for path, field, odd in ODD_TARGETS for value in odd],
)
def test_fast_path_agrees_with_reference_for_every_single_fault(path, field, value):
    """Exhaustive: a clean, fully populated record with one odd value, both paths agree."""
    limits = Limits()
    rec = record("fuzz-a", 3, spearman=-0.5, entropy=2.0, loss=1.0, learning_rate=1e-4)
    rec.components.add(layer=1, projection="k", spearman=0.2, score_mean=0.1)
    rec.entropy_covariance, rec.probe_seconds, rec.spearman_per_token_type = -0.1, 0.5, -0.4
    clean = _outcome(check_record, rec, limits)
    assert clean == _outcome(check_record_slow, rec, limits) and clean[0] == 0
    inject(rec, path, field, value)
    assert _outcome(check_record, rec, limits) == _outcome(check_record_slow, rec, limits)


def test_pushes_queued_behind_a_busy_writer_share_one_commit(tmp_path):
    gate = _Gate()
    with MonitorServer(config(tmp_path), listeners=[gate]) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        first = stub.Push.future(push_request(stub, record("run1", 1)), timeout=TIMEOUT)
        assert gate.entered.wait(TIMEOUT)  # the writer is busy with the first push
        queued = [
            stub.Push.future(push_request(stub, record("run1", seq)), timeout=TIMEOUT)
            for seq in range(2, 12)
        ]
        depth = ("inversion_monitor_writer_queue_depth", ())
        wait_until("11 queued writes", lambda: samples(scrape_text(server))[depth] >= 11, TIMEOUT)
        assert samples(scrape_text(server))[depth] == 11
        gate.release.set()
        results = [first.result(), *(f.result() for f in queued)]
        assert results[0].acks[0].acked_sequence == 1
        assert max(r.acks[0].acked_sequence for r in results) == 11
        s = samples(scrape_text(server))
        assert s[("inversion_monitor_push_commits_total", ())] == 2
        assert s[("inversion_monitor_records_ingested_total", ())] == 11
