"""The committed generated code matches the .proto files."""

from __future__ import annotations

from pathlib import Path

from inversion_monitor.proto import generate
from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "protoc produced nothing"
    for fresh in written:
        committed = generate.PROTO_ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python proto/generate.py"
        assert fresh.read_text() == committed.read_text(), (
            f"{committed.name} differs from the .proto: run python proto/generate.py and commit"
        )


def test_messages_round_trip() -> None:
    record = monitor_pb2.StepRecord(run_id="abc", rank=1, sequence=7, step=100, wall_time=1.5)
    record.inversion.spearman.value = -0.5
    record.inversion.n = 64
    parsed = monitor_pb2.StepRecord.FromString(record.SerializeToString())
    assert parsed == record
    assert parsed.inversion.spearman.HasField("value")
    assert not parsed.inversion.pearson.HasField("value")
    assert hasattr(monitor_pb2_grpc, "MonitorServiceStub")


def test_probe_precision_travels_is_checked_and_exported() -> None:
    import pytest

    from inversion_monitor.server.series import gauge_values, run_lines
    from inversion_monitor.server.state import RunView, with_last_probe
    from inversion_monitor.server.validate import Limits, RecordProblem, check_record
    from inversion_monitor.telemetry.wire import step_record

    record = step_record(
        run_id="r", rank=0, step=3, wall_time=1.0, stats=None, probe_precision="bf16-autocast"
    )
    assert record.probe_precision == "bf16-autocast"
    with pytest.raises(ValueError, match="probe_precision"):
        step_record(run_id="r", rank=0, step=3, wall_time=1.0, stats=None, probe_precision="bf8")
    assert check_record(record, Limits(), now=2.0) == 0
    health = monitor_pb2.StepRecord(run_id="r", step=4, wall_time=2.0, loss=1.0)
    assert with_last_probe(health, record).probe_precision == "bf16-autocast"  # kept in view
    bad = monitor_pb2.StepRecord(run_id="r", step=3, wall_time=1.0, probe_precision="int4")
    with pytest.raises(RecordProblem, match="probe_precision"):
        check_record(bad, Limits(), now=2.0)
    view = RunView(
        "r",
        1,
        "demo",
        monitor_pb2.RunInfo(),
        0.0,
        1.0,
        1.0,
        "running",
        1,
        record,
        record,
        gauge_values(record),
    )
    lines = "".join(run_lines(view, extended=True))
    assert 'inversion_monitor_probe_precision{run="demo",precision="bf16-autocast"} 1.0' in lines
