"""Per-step health records on the server: stored, exported, non-finite kept, probes kept."""

from __future__ import annotations

import math

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import HEALTH_FIELDS
from inversion_monitor.server.config import Limits
from inversion_monitor.server.validate import (
    HEALTH_RANGES,
    RecordProblem,
    check_record,
    check_record_slow,
)
from tests.server_support import (
    TIMEOUT,
    open_run,
    promtool_check,
    push,
    record,
    run_sample,
    running,
    scrape_text,
    stub_for,
)


def health(sequence: int, **values: float) -> monitor_pb2.StepRecord:
    """A health-only record (no inversion statistics) of step ``sequence``."""
    return record("run1", sequence, step=sequence, spearman=None, entropy=None, **values)


def test_health_records_keep_the_last_probes_inversion_gauges_and_export_health(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="alpha", kind="rl")
        probe = record("run1", 1, step=1, spearman=-0.3, loss=2.0, grad_norm=1.0)
        push(stub, probe, health(2, loss=1.9, grad_norm=1.5, kl=0.01))
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_step", "alpha") == 2
        assert run_sample(text, "inversion_monitor_spearman", "alpha") == -0.3  # kept
        assert run_sample(text, "inversion_monitor_entropy_mean_nats", "alpha") == 2.0
        assert run_sample(text, "inversion_monitor_loss", "alpha") == 1.9
        assert run_sample(text, "inversion_monitor_grad_norm", "alpha") == 1.5
        assert run_sample(text, "inversion_monitor_kl", "alpha") == 0.01

        # a later push of health only, then a diverged step: NaN loss, infinite grad norm
        push(stub, health(3, loss=1.8, clip_ratio=0.2, completion_length_mean=31.5))
        push(stub, health(4, loss=math.nan, grad_norm=math.inf, learning_rate=1e-4))
        text = scrape_text(server)
        assert promtool_check(text).returncode == 0, promtool_check(text).stderr
        assert run_sample(text, "inversion_monitor_spearman", "alpha") == -0.3
        assert math.isnan(run_sample(text, "inversion_monitor_loss", "alpha") or 0.0)
        assert run_sample(text, "inversion_monitor_grad_norm", "alpha") == math.inf
        assert 'inversion_monitor_grad_norm{run="alpha"} +Inf' in text
        assert 'inversion_monitor_loss{run="alpha"} NaN' in text
        assert run_sample(text, "inversion_monitor_nonfinite_health_values", "alpha") == 2
        assert run_sample(text, "inversion_monitor_clip_ratio", "alpha") is None  # step 4's

        got = stub.GetRun(monitor_pb2.GetRunRequest(run="alpha"), timeout=TIMEOUT)
        by_step = {r.step: r for r in got.history}
        assert sorted(by_step) == [1, 2, 3, 4]
        assert not by_step[2].HasField("inversion")  # stored as sent
        assert math.isnan(by_step[4].loss) and by_step[4].grad_norm == math.inf
        assert list(by_step[4].nonfinite_fields) == ["loss", "grad_norm"]  # named by the server
        assert got.summary.latest.inversion.spearman.value == -0.3
        assert got.summary.latest.step == 4

        # a new probe replaces the kept values
        push(stub, record("run1", 5, step=5, spearman=-0.6))
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_spearman", "alpha") == -0.6

    with running(tmp_path) as server, stub_for(server) as stub:  # restart: the same view
        push_after = health(6, loss=1.7)
        open_run(stub, "run1")
        push(stub, push_after)
        text = scrape_text(server)
        assert run_sample(text, "inversion_monitor_spearman", "alpha") == -0.6
        assert run_sample(text, "inversion_monitor_loss", "alpha") == 1.7


def test_a_probe_and_a_later_health_record_in_one_push(tmp_path):
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1", name="alpha")
        push(stub, record("run1", 1, spearman=-0.1), health(2))
        push(stub, record("run1", 3, spearman=-0.7), health(4, loss=1.0))
        assert run_sample(scrape_text(server), "inversion_monitor_spearman", "alpha") == -0.7


@pytest.mark.parametrize(
    ("names", "values", "field", "message"),
    [
        (["spearman"], {}, "nonfinite_fields[0]", "expected one of loss, grad_norm"),
        (["loss", "loss"], {"loss": math.nan}, "nonfinite_fields[1]", "names 'loss' twice"),
        (["loss"], {"loss": 2.0}, "nonfinite_fields[0]", "but loss is 2.0 (finite)"),
        (["loss"] * 11, {}, "nonfinite_fields", "there are 10 health fields"),
        ([], {"clip_ratio": 1.5}, "clip_ratio", "clip_ratio is 1.5; it must be <= 1.0"),
        ([], {"grad_norm": -2.0}, "grad_norm", "grad_norm is -2.0; it must be >= 0.0"),
    ],
)
def test_bad_health_input_is_rejected_naming_the_field(names, values, field, message, tmp_path):
    rec = health(1, **values)
    rec.nonfinite_fields.extend(names)
    for check in (check_record, check_record_slow):
        with pytest.raises(RecordProblem) as caught:
            check(rec, Limits(), now=1.0)
        assert caught.value.field == field and message in caught.value.message
    with running(tmp_path) as server, stub_for(server) as stub:
        open_run(stub, "run1")
        response = push(stub, rec)
        assert [r.field for r in response.rejected] == [f"records[0].{field}"]
        assert response.accepted == 0


def test_a_named_value_that_was_not_sent_is_accepted_and_the_names_ordered():
    rec = health(1, grad_norm=math.inf)
    rec.nonfinite_fields.extend(["grad_norm", "loss"])  # loss: dropped by the sender
    assert check_record(rec, Limits(), now=1.0) == 0  # nothing cleared
    assert list(rec.nonfinite_fields) == ["loss", "grad_norm"]
    assert not rec.HasField("loss")


def test_health_ranges_cover_the_contract():
    assert tuple(HEALTH_RANGES) == HEALTH_FIELDS
    fields = monitor_pb2.StepRecord.DESCRIPTOR.fields_by_name
    assert all(fields[name].has_presence for name in HEALTH_FIELDS)
