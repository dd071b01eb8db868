"""A record's values read once (record_values) against reading each field by name.

The check's one pass (:func:`plain_values`) and the reading of a sanitised record
(:func:`read_values`) must give what HasField and a plain read give, field for field
(None for unset, -0.0 kept, NaN kept); the listeners fed those values
(``on_values``) must end in the same state as when fed the records (``on_record``).
"""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import given, settings

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import HEALTH_FIELDS
from inversion_monitor.server.alerts import AlertEngine
from inversion_monitor.server.config import Limits, ServerConfig
from inversion_monitor.server.detectors import AlertsConfig
from inversion_monitor.server.entropy_law import EntropyLawMonitor
from inversion_monitor.server.ingest import Ingestor
from inversion_monitor.server.record_values import Observation, plain_values, read_values
from inversion_monitor.server.store import Store
from inversion_monitor.server.validate import (
    RecordProblem,
    check_record_slow,
    validate_record,
)
from tests.server_support import plausible_records, step_records

# the health doubles in Observation's order
HEALTH = tuple(field for field in Observation._fields if field in HEALTH_FIELDS)


def _by_name(rec: monitor_pb2.StepRecord) -> tuple[Any, ...]:
    """Every value by name, asking HasField for each optional one."""
    inv = rec.inversion
    sp = inv.spearman.value if inv.spearman.HasField("value") else None
    return (
        ("step", rec.step),
        ("wall_time", rec.wall_time),
        ("rho", None if inv.insufficient else sp),
        ("n", inv.n),
        ("entropy_mean", rec.entropy.mean if rec.entropy.HasField("mean") else None),
        *((name, getattr(rec, name) if rec.HasField(name) else None) for name in HEALTH),
        ("nonfinite_fields", tuple(rec.nonfinite_fields)),
        ("rank", rec.rank),
        ("spearman", sp),
        ("pearson", inv.pearson.value if inv.pearson.HasField("value") else None),
        ("score_mean", rec.score.mean if rec.score.HasField("mean") else None),
    )


def _exact(values: Observation) -> tuple[Any, ...]:
    """Comparable exactly: floats by repr (NaN equals NaN, -0.0 differs from 0.0)."""
    return tuple(
        (name, repr(v) if isinstance(v, float) else v)
        for name, v in zip(values._fields, values, strict=True)
    )


def _exact_ref(pairs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((name, repr(v) if isinstance(v, float) else v) for name, v in pairs)


def _outcome(check: Any, rec: monitor_pb2.StepRecord, limits: Limits) -> tuple[Any, ...]:
    copy = monitor_pb2.StepRecord()
    copy.CopyFrom(rec)
    try:
        result: Any = check(copy, limits)
    except RecordProblem as exc:
        result = (exc.field, exc.reason, exc.message)
    return result, copy.SerializeToString(deterministic=True)


def _fast(rec: monitor_pb2.StepRecord, limits: Limits) -> tuple[Any, ...]:
    bad, values = validate_record(rec, limits, 123.0)
    return bad, _exact(values)


def _slow(rec: monitor_pb2.StepRecord, limits: Limits) -> tuple[Any, ...]:
    bad = check_record_slow(rec, limits, 123.0)
    return bad, _exact_ref(_by_name(rec))


def _health_record(rng: random.Random) -> monitor_pb2.StepRecord:
    rec = monitor_pb2.StepRecord(
        run_id="r", rank=rng.choice([0, 0, 1]), step=rng.randint(0, 99), wall_time=5.0
    )
    for name in HEALTH:
        if rng.random() < 0.4:
            setattr(rec, name, rng.choice([0.0, -0.0, 0.5, 2.0, math.nan, math.inf, -3.0]))
    if rng.random() < 0.3:
        rec.nonfinite_fields.append(rng.choice(["loss", "grad_norm", "kl"]))
    if rng.random() < 0.2:
        rec.probe_precision = rng.choice(["", "fp32", "bf16-autocast", "fp8"])
    if rng.random() < 0.2:
        rec.policy_entropy.mean = rng.choice([0.0, 1.0, -1.0])
    if rng.random() < 0.5:
        rec.inversion.insufficient = rng.random() < 0.3
        rec.inversion.spearman.value = rng.choice([0.0, -0.0, -0.4])
        rec.inversion.pearson.value = rng.choice([0.0, -0.0, -0.3])
    if rng.random() < 0.5:
        rec.score.mean = rng.choice([0.0, -0.0, 0.7])
    return rec


@settings(max_examples=400, deadline=None)
@given(rec=plausible_records() | step_records())
def test_validate_record_values_are_the_sanitised_records_read_by_name(rec):
    """Verdict, message, sanitised record and every value: the same as the field-by-field
    check followed by reading each field with HasField."""
    limits = Limits(max_components=4, max_samples=4)
    assert _outcome(_fast, rec, limits) == _outcome(_slow, rec, limits)


def test_health_values_presence_sign_and_non_finite_match_reading_by_name() -> None:
    """Unset health values are None, one sent as 0 or -0 keeps its value and sign, a
    non-finite one stays NaN/inf (flagged, not dropped), bad names and ranges are refused
    with the same message; plainly valid records are read in the check's pass."""
    rng = random.Random(28)
    limits = Limits()
    plain = 0
    for _ in range(3000):
        rec = _health_record(rng)
        plain += plain_values(rec, limits) is not None
        assert _outcome(_fast, rec, limits) == _outcome(_slow, rec, limits)
    assert 200 < plain < 2800  # both paths were taken


def test_read_values_matches_reading_by_name() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        rec = _health_record(rng)
        assert _exact(read_values(rec)) == _exact_ref(_by_name(rec))


def _stream(rng: random.Random, n: int) -> list[monitor_pb2.StepRecord]:
    records = []
    level = 2.0
    for step in range(1, n):
        rec = monitor_pb2.StepRecord(run_id="r", rank=0, sequence=step, step=step, wall_time=1.0)
        if step % 150 == 75:
            level *= rng.choice([0.2, 5.0])
        rec.loss = level * math.exp(rng.gauss(0.0, 0.05))
        if step % 97 == 0:
            rec.loss = math.nan
            rec.nonfinite_fields.append("loss")
        rec.reward_mean = rng.uniform(0.0, 1.0) + step / n
        rec.policy_entropy_mean = 2.0 * math.exp(-step / n)
        rec.inversion.n = 512
        rec.inversion.spearman.value = -0.5 if step < n // 2 else rng.uniform(-0.1, 0.3)
        rec.inversion.spearman.ci_high = rec.inversion.spearman.value + 0.05
        rec.entropy.mean = 3.0 * math.exp(-3.0 * step / n)
        records.append(rec)
    return records


def test_listeners_fed_values_end_as_when_fed_records(tmp_path) -> None:
    """AlertEngine and EntropyLawMonitor through the ingestor (on_values, the values read by
    the check) and fed each stored record (on_record): the same alerts and law states."""
    records = _stream(random.Random(3), 900)
    store = Store(tmp_path / "v.db")
    engine, law = AlertEngine(AlertsConfig(), store), EntropyLawMonitor()
    plain_listener: list[int] = []

    class Steps:  # a listener without on_values still gets the records
        def on_record(self, run_id: str, display_name: str, rec: monitor_pb2.StepRecord) -> None:
            plain_listener.append(rec.step)

    ing = Ingestor(store, ServerConfig(), [engine, law, Steps()])
    info = monitor_pb2.RunInfo(run_id="r", name="r", world_size=1, kind="rl")
    session = ing.open_run(monitor_pb2.OpenRunRequest(run=info), now=1.0).writer_session
    for first in range(0, len(records), 50):
        push = monitor_pb2.PushRequest(writer_session=session)
        push.records.extend(records[first : first + 50])
        assert ing.push(push, now=2.0).accepted == len(push.records)
    ref_engine, ref_law = AlertEngine(AlertsConfig()), EntropyLawMonitor()
    ref_engine.on_run_open("r", "r", info)
    for rec in records:
        ref_engine.on_record("r", "r", rec)
        ref_law.on_record("r", "r", rec)
    assert plain_listener == [rec.step for rec in records]
    assert ing.counters.listener_errors == 0

    def alerts(e: AlertEngine) -> list[tuple[Any, ...]]:
        return [(a.name, a.active, a.start_step, a.end_step, a.summary) for a in e.alerts("r")]

    assert alerts(engine) == alerts(ref_engine)
    assert {a[0] for a in alerts(engine)} >= {"NonFiniteTraining", "LossSpike"}
    assert law.snapshot() == ref_law.snapshot() and law.snapshot()
    ing.close()
