"""push.rows' SQL columns against reading each optional double with HasField.

The record's check reads a statistic's value once, and asks whether it was sent only
when it reads 0 (a stored row must say NULL for a statistic not sent and 0 for one sent
as 0); rows takes those values. Here every column is checked against the plain HasField
reading for records with each statistic unset, 0, -0, NaN (cleared by the check, so NULL),
values and negatives.
"""

from __future__ import annotations

import random

import pytest

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server import push as steps
from inversion_monitor.server.config import Limits
from inversion_monitor.server.state import RankState, RunState
from inversion_monitor.server.validate import validate_record


def _reference_columns(rec: monitor_pb2.StepRecord) -> tuple[object, ...]:
    inv = rec.inversion
    return (
        rec.sequence,
        rec.step,
        rec.wall_time,
        inv.spearman.value if inv.spearman.HasField("value") else None,
        inv.pearson.value if inv.pearson.HasField("value") else None,
        rec.entropy.mean if rec.entropy.HasField("mean") else None,
        rec.score.mean if rec.score.HasField("mean") else None,
        rec.SerializeToString(),
    )


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_rows_store_null_for_unset_and_the_value_for_set_statistics(order: str) -> None:
    """Every column equals the HasField reading of the checked record, whether the check
    read the values in its one pass or from the sanitised record (a NaN cleared); the newest
    record and the newest with inversion statistics are the brute-force ones, in any order."""
    rng = random.Random(11)
    run = RunState(
        pk=7,
        run_id="r",
        display_name="r",
        info=monitor_pb2.RunInfo(run_id="r"),
        world_size=1,
        opened_time=0.0,
        last_update_time=None,
        last_activity=0.0,
        status="running",
        records=0,
    )
    records = []
    for seq in range(1, 600):
        rec = monitor_pb2.StepRecord(run_id="r", sequence=seq, step=seq, wall_time=1.0 + seq)
        # each in its valid range, or NaN (cleared by the check's field-by-field path)
        correlations = [0.0, -0.0, 0.25, -0.4, -1.0, 1e-300, float("nan")]
        means = [0.0, -0.0, 0.25, 3.5, 1e-300]
        for msg, name, values in (
            (rec.inversion.spearman, "value", correlations),
            (rec.inversion.pearson, "value", correlations),
            (rec.entropy, "mean", means),
            (rec.score, "mean", means),
        ):
            if rng.random() < 0.6:
                setattr(msg, name, rng.choice(values))
        if rng.random() < 0.2:
            rec.inversion.n = 64  # the inversion sent without its correlations
        records.append(rec)
    records[-1].ClearField("inversion")  # the newest record is not the newest probe
    if order == "shuffled":
        rng.shuffle(records)
    store = []
    cleared = 0
    for i, rec in enumerate(records):
        nonfinite, values = validate_record(rec, Limits(), now=1.0)
        cleared += nonfinite
        store.append((i, rec, rec.sequence, values))
    batch = steps.Batch(run, 0, RankState(), store=store)
    group = steps.Group()
    steps.rows(batch, 5.0, group, monitor_pb2.PushResponse())
    newest = max(records, key=lambda r: r.sequence)
    probe = max((r for r in records if r.HasField("inversion")), key=lambda r: r.sequence)
    assert group.newest[("r", 0)] == (newest.sequence, newest)
    assert group.newest_probe[("r", 0)] == (probe.sequence, probe)
    assert probe.sequence < newest.sequence
    assert len(group.rows) == len(records)
    for row, rec in zip(group.rows, records, strict=True):
        assert row[:2] == (7, 0) and row[5] == 5.0
        got = (*row[2:5], *row[6:])
        want = _reference_columns(rec)
        assert got == want
        # -0.0 == 0.0: the sign must survive as well
        assert [str(x) for x in got[3:7]] == [str(x) for x in want[3:7]]
    assert sum(row[6] is None for row in group.rows) > 100  # both kinds were there
    assert sum(row[6] == 0.0 for row in group.rows) > 20
    assert cleared > 20  # and the field-by-field path was taken
