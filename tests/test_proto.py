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
