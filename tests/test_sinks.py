"""The sinks of the engine, and the delivery knobs of MonitorConfig reaching the client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.sinks import GrpcSink, JsonlSink, Sink, TrainerLogSink, TrainingRecord
from inversion_monitor.metrics.stats import InversionStats
from tests.scripted_server import ServerHandle


def _record(step: int, run_id: str = "sinks") -> TrainingRecord:
    stats = InversionStats.insufficient_sample(n=3, reason="n < 4")
    return TrainingRecord(
        run_id=run_id, run_name="sink run", rank=0, step=step, stats=stats, probe_seconds=0.01
    )


def test_delivery_knobs_from_the_environment_reach_the_client() -> None:
    handle = ServerHandle().start()
    try:
        environ = {
            "INVERSION_MONITOR_ENDPOINT": handle.endpoint,
            "INVERSION_MONITOR_BATCH_SIZE": "3",
            "INVERSION_MONITOR_MAX_BUFFER": "6",
            "INVERSION_MONITOR_FLUSH_INTERVAL_S": "0.05",
            "INVERSION_MONITOR_CLOSE_TIMEOUT_S": "2",
        }
        config = MonitorConfig.from_env(environ)
        sink: Sink = GrpcSink(
            config, rank=0, world_size=1, framework="custom", model_type=lambda: "llama"
        )
        for step in range(10):
            sink.emit(_record(step))
            assert sink.flush(timeout_s=10)
        assert isinstance(sink, GrpcSink) and sink.client is not None
        assert sink.client.close_timeout_s == 2.0
        report = sink.close(timeout_s=5)
        assert report is not None and report.delivered == 10
        pushes = handle.servicer.call_log("Push")
        assert pushes and max(call.records for call in pushes) <= 3
        assert handle.servicer.steps("sinks") == list(range(10))
        assert handle.servicer.runs["sinks"].model_type == "llama"
    finally:
        handle.stop()


def test_a_buffer_smaller_than_a_batch_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"max_buffer=2 must be >= batch_size=5"):
        MonitorConfig(max_buffer=2, batch_size=5)
    with pytest.raises(ValueError, match="flush_interval_s"):
        MonitorConfig(flush_interval_s=0)


def test_jsonl_sink_writes_one_plain_json_line_per_record(tmp_path: Path) -> None:
    sink: Sink = JsonlSink(tmp_path / "m.jsonl", rank=1, world_size=2)
    sink.emit(_record(4))
    sink.close(timeout_s=1)
    (line,) = (tmp_path / "m.rank1.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row["step"] == 4 and row["insufficient"] is True and row["probed"] is True
    assert row["spearman"] is None  # a NaN statistic travels as null


def test_jsonl_health_rows_keep_non_finite_values_and_name_them(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "m.jsonl", rank=0, world_size=1)
    health = {"loss": math.nan, "grad_norm": math.inf, "learning_rate": 1e-4}
    sink.emit(TrainingRecord(run_id="r", run_name="n", rank=0, step=7, health=health))
    sink.close(timeout_s=1)
    (line,) = (tmp_path / "m.jsonl").read_text().splitlines()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert row["probed"] is False and "spearman" not in row
    assert (row["loss"], row["grad_norm"], row["learning_rate"]) == ("nan", "inf", 1e-4)
    assert math.isnan(float(row["loss"])) and float(row["grad_norm"]) == math.inf
    assert row["nonfinite_fields"] == ["loss", "grad_norm"]


def test_trainer_log_sink_ignores_health_only_records() -> None:
    sink = TrainerLogSink()
    sink.emit(TrainingRecord(run_id="r", run_name="n", rank=0, step=1, health={"loss": 1.0}))
    assert sink.take() is None


def test_trainer_log_sink_hands_each_record_out_once() -> None:
    sink = TrainerLogSink()
    assert sink.take() is None
    sink.emit(_record(1))
    metrics = sink.take()
    assert metrics is not None and math.isnan(metrics["inversion/spearman"])
    assert sink.take() is None
