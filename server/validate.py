"""Checks and sanitises one ``StepRecord`` before it is stored, and checks a ``RunInfo``.

Non-finite inversion statistics (NaN, +-Inf) are cleared, so they are stored as
missing and never reach /metrics; the caller counts them. Non-finite training
health values (:data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`: a NaN
loss, an infinite grad norm) are the news a person on call needs: they are
kept as they are and named in ``nonfinite_fields`` (added there when the
client did not). A value outside its range, a list over its limit, or a name
in ``nonfinite_fields`` that is not a health field (or names a finite value)
rejects the record with the field that is wrong.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import (
    HEALTH_FIELDS,
    PROBE_PRECISIONS,
    PROJECTIONS,
    RUN_KINDS,
    one_of,
)
from inversion_monitor.server.config import Limits
from inversion_monitor.server.errors import InvalidArgument
from inversion_monitor.server.jsonsafe import loads_bounded
from inversion_monitor.server.names import LABEL_KEY_RE, valid_run_id
from inversion_monitor.server.record_values import (
    MAX_REASON_LENGTH,
    WIRE_PROJECTIONS,
    Observation,
    plain_values,
    read_values,
)

# absolute slack for float round-off at a range boundary; such values are clamped
_TOL = 1e-6
_INF = math.inf
_isfinite = math.isfinite
# "": not given (older clients)
_WIRE_KINDS = frozenset(("", *RUN_KINDS))
# health field -> (lowest, highest) finite value; non-finite values are kept
HEALTH_RANGES: dict[str, tuple[float, float]] = {
    "loss": (-_INF, _INF),
    "grad_norm": (0.0, _INF),
    "learning_rate": (0.0, _INF),
    "reward_mean": (-_INF, _INF),
    "reward_std": (0.0, _INF),
    "policy_entropy_mean": (0.0, _INF),
    "entropy_covariance": (-_INF, _INF),
    "kl": (-_INF, _INF),  # estimators other than k3 can be negative
    "clip_ratio": (0.0, 1.0),
    "completion_length_mean": (0.0, _INF),
}
RUN_INFO_MAX_LENGTHS = {
    "name": 256,
    "project": 128,
    "framework": 64,
    "model_type": 64,
    "client_version": 64,
}


class RejectReason(str, Enum):
    """Why a record was rejected; the ``reason`` label of ``records_rejected_total``.

    >>> RejectReason.OUT_OF_RANGE.value
    'out_of_range'
    """

    OUT_OF_RANGE = "out_of_range"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BAD_SEQUENCE = "bad_sequence"


class RecordProblem(Exception):
    """A field of a record that makes it unusable (``field`` is relative to the record).

    >>> p = RecordProblem("step", RejectReason.OUT_OF_RANGE, "step is -1; it must be >= 0")
    >>> p.field, p.reason.value
    ('step', 'out_of_range')
    """

    def __init__(self, field: str, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason
        self.message = message


def _bounded(msg: Any, name: str, lo: float, hi: float, path: str) -> int:
    """Check an ``optional double``; clear it if non-finite (returns 1), else range-check."""
    if not msg.HasField(name):
        return 0
    value = getattr(msg, name)
    if not _isfinite(value):
        msg.ClearField(name)
        return 1
    if value < lo:
        if value < lo - _TOL:
            raise RecordProblem(
                path, RejectReason.OUT_OF_RANGE, f"{path} is {value!r}; it must be >= {lo}"
            )
        setattr(msg, name, lo)
    elif value > hi:
        if value > hi + _TOL:
            raise RecordProblem(
                path, RejectReason.OUT_OF_RANGE, f"{path} is {value!r}; it must be <= {hi}"
            )
        setattr(msg, name, hi)
    return 0


def _correlation(msg: Any, path: str) -> int:
    bad = _bounded(msg, "value", -1.0, 1.0, path + ".value")
    bad += _bounded(msg, "ci_low", -1.0, 1.0, path + ".ci_low")
    bad += _bounded(msg, "ci_high", -1.0, 1.0, path + ".ci_high")
    return bad


def _summary(msg: Any, path: str, lo: float = 0.0) -> int:
    bad = 0
    for name in ("mean", "p10", "p50", "p90"):
        bad += _bounded(msg, name, lo, _INF, f"{path}.{name}")
    return bad


def _samples(record: monitor_pb2.StepRecord, limits: Limits) -> int:
    samples = record.samples
    count = len(samples)
    if count > limits.max_samples:
        raise RecordProblem(
            "samples",
            RejectReason.TOO_LARGE,
            f"samples has {count} entries; max_samples is {limits.max_samples}",
        )
    if not count:
        return 0
    entropies = [s.entropy for s in samples]
    scores = [s.score for s in samples]
    if _isfinite(sum(entropies) + sum(scores)) and min(entropies) >= 0 and min(scores) >= 0:
        return 0
    kept: list[tuple[float, float, int]] = []
    dropped = 0
    for j, (entropy, score) in enumerate(zip(entropies, scores, strict=True)):
        if not (_isfinite(entropy) and _isfinite(score)):
            dropped += 1
            continue
        for name, value in (("entropy", entropy), ("score", score)):
            if value < 0:
                raise RecordProblem(
                    f"samples[{j}].{name}",
                    RejectReason.OUT_OF_RANGE,
                    f"samples[{j}].{name} is {value!r}; it must be >= 0",
                )
        kept.append((entropy, score, samples[j].token_id))
    del samples[:]
    for entropy, score, token_id in kept:
        samples.add(entropy=entropy, score=score, token_id=token_id)
    return dropped


def _components(record: monitor_pb2.StepRecord, limits: Limits) -> int:
    components = record.components
    if len(components) > limits.max_components:
        raise RecordProblem(
            "components",
            RejectReason.TOO_LARGE,
            f"components has {len(components)} entries; max_components is {limits.max_components}",
        )
    bad = 0
    for j, comp in enumerate(components):
        if comp.projection not in WIRE_PROJECTIONS:
            raise RecordProblem(
                f"components[{j}].projection",
                RejectReason.MALFORMED,
                f"components[{j}].projection is {comp.projection[:16]!r}; "
                f"expected one of {one_of(PROJECTIONS)}",
            )
        bad += _bounded(comp, "spearman", -1.0, 1.0, f"components[{j}].spearman")
        bad += _bounded(comp, "score_mean", 0.0, _INF, f"components[{j}].score_mean")
    return bad


def check_record(record: monitor_pb2.StepRecord, limits: Limits, now: float) -> int:
    """Validate and sanitise ``record`` in place; returns how many non-finite values it cleared.

    A ``wall_time`` of 0 (unset) becomes ``now``. Raises :class:`RecordProblem`
    for the first field that makes the record unusable.

    >>> rec = monitor_pb2.StepRecord(run_id="r", sequence=1, step=3)
    >>> rec.inversion.spearman.value = float("nan")
    >>> rec.entropy.mean = 2.5
    >>> check_record(rec, Limits(), now=100.0), rec.inversion.spearman.HasField("value")
    (1, False)
    >>> rec.step = -1
    >>> check_record(rec, Limits(), now=100.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    inversion_monitor.server.validate.RecordProblem: step is -1; it must be >= 0 ...
    """
    return validate_record(record, limits, now)[0]


def validate_record(
    record: monitor_pb2.StepRecord, limits: Limits, now: float
) -> tuple[int, Observation]:
    """:func:`check_record`, and the values of the checked record, read once
    (:mod:`.record_values`): in the check's one pass when the record was plainly valid,
    else from the sanitised record.

    >>> rec = monitor_pb2.StepRecord(run_id="r", sequence=1, step=3, wall_time=5.0)
    >>> rec.entropy.mean = 2.5
    >>> bad, values = validate_record(rec, Limits(), now=100.0)
    >>> bad, values.step, values.wall_time, values.entropy_mean, values.spearman
    (0, 3, 5.0, 2.5, None)
    """
    values = plain_values(record, limits)
    if values is not None:
        return 0, values
    bad = check_record_slow(record, limits, now)
    return bad, read_values(record)


def check_record_slow(record: monitor_pb2.StepRecord, limits: Limits, now: float) -> int:
    """:func:`check_record` field by field, without the fast path (the reference)."""
    if record.step < 0:
        raise RecordProblem(
            "step",
            RejectReason.OUT_OF_RANGE,
            f"step is {record.step}; it must be >= 0 (the trainer's global step)",
        )
    wall_time = record.wall_time
    if wall_time == 0.0:
        record.wall_time = now
    elif not _isfinite(wall_time) or wall_time < 0:
        raise RecordProblem(
            "wall_time",
            RejectReason.OUT_OF_RANGE,
            f"wall_time is {wall_time!r}; expected Unix seconds (>= 0), or 0 for the server's time",
        )
    bad = 0
    if record.HasField("inversion"):
        inv = record.inversion
        bad += _correlation(inv.spearman, "inversion.spearman") if inv.HasField("spearman") else 0
        bad += _correlation(inv.pearson, "inversion.pearson") if inv.HasField("pearson") else 0
        confidence = inv.confidence
        if not _isfinite(confidence):
            inv.confidence = 0.0
            bad += 1
        elif not 0.0 <= confidence < 1.0:
            raise RecordProblem(
                "inversion.confidence",
                RejectReason.OUT_OF_RANGE,
                f"inversion.confidence is {confidence!r}; expected 0 <= confidence < 1",
            )
        if len(inv.insufficient_reason) > MAX_REASON_LENGTH:
            inv.insufficient_reason = inv.insufficient_reason[:MAX_REASON_LENGTH]
    if record.HasField("entropy"):
        bad += _summary(record.entropy, "entropy")
    if record.HasField("score"):
        bad += _summary(record.score, "score")
    _health(record)
    bad += _bounded(record, "probe_seconds", 0.0, _INF, "probe_seconds")
    if record.HasField("probe_precision") and record.probe_precision not in PROBE_PRECISIONS:
        raise RecordProblem(
            "probe_precision",
            RejectReason.MALFORMED,
            f"probe_precision is {record.probe_precision[:16]!r}; expected one of "
            f"{one_of(PROBE_PRECISIONS)}",
        )
    bad += _bounded(record, "spearman_per_token_type", -1.0, 1.0, "spearman_per_token_type")
    if record.HasField("policy_entropy"):
        bad += _summary(record.policy_entropy, "policy_entropy")
    if record.HasField("advantage"):
        bad += _summary(record.advantage, "advantage", lo=-_INF)
    if record.components:
        bad += _components(record, limits)
    if record.samples:
        bad += _samples(record, limits)
    return bad


def _health(record: monitor_pb2.StepRecord) -> None:
    """Range-check the finite health values; keep the non-finite ones, each named once in
    ``nonfinite_fields`` (in the contract's order); reject a bad name."""
    named = record.nonfinite_fields
    if len(named) > len(HEALTH_FIELDS):
        raise RecordProblem(
            "nonfinite_fields",
            RejectReason.TOO_LARGE,
            f"nonfinite_fields has {len(named)} entries; there are {len(HEALTH_FIELDS)} "
            "health fields",
        )
    given: set[str] = set()
    for j, name in enumerate(named):
        path = f"nonfinite_fields[{j}]"
        if name not in HEALTH_RANGES:
            raise RecordProblem(
                path,
                RejectReason.MALFORMED,
                f"{path} is {name[:40]!r}; expected one of {', '.join(HEALTH_FIELDS)}",
            )
        if name in given:
            raise RecordProblem(path, RejectReason.MALFORMED, f"{path} names {name!r} twice")
        if record.HasField(name) and _isfinite(getattr(record, name)):
            raise RecordProblem(
                path,
                RejectReason.MALFORMED,
                f"{path} names {name!r}, but {name} is {getattr(record, name)!r} (finite): "
                "name only the health values that are NaN or infinite",
            )
        given.add(name)
    nonfinite = []
    for name, (lo, hi) in HEALTH_RANGES.items():
        if not record.HasField(name):
            if name in given:  # non-finite, value not sent (a reader that drops them)
                nonfinite.append(name)
            continue
        value = getattr(record, name)
        if not _isfinite(value):
            nonfinite.append(name)
        elif value < lo or value > hi:
            if value < lo - _TOL or value > hi + _TOL:
                bound = f">= {lo}" if value < lo else f"<= {hi}"
                raise RecordProblem(
                    name, RejectReason.OUT_OF_RANGE, f"{name} is {value!r}; it must be {bound}"
                )
            setattr(record, name, min(max(value, lo), hi))
    if list(named) != nonfinite:
        del named[:]
        named.extend(nonfinite)


def check_run_info(info: monitor_pb2.RunInfo, rank: int, limits: Limits) -> None:
    """Raise :class:`~.errors.InvalidArgument` naming the first field of ``info`` that is wrong."""
    if not valid_run_id(info.run_id):
        raise InvalidArgument(
            f"run.run_id is {info.run_id[:80]!r}; expected 1..64 characters of "
            "[A-Za-z0-9_.-] (e.g. uuid4().hex)"
        )
    for name, max_length in RUN_INFO_MAX_LENGTHS.items():
        length = len(getattr(info, name))
        if length > max_length:
            raise InvalidArgument(f"run.{name} has {length} characters; the limit is {max_length}")
    if len(info.config_json) > limits.max_config_json_length:
        raise InvalidArgument(
            f"run.config_json has {len(info.config_json)} characters; "
            f"max_config_json_length is {limits.max_config_json_length}"
        )
    if info.kind not in _WIRE_KINDS:
        raise InvalidArgument(
            f"run.kind is {info.kind[:40]!r}; expected {one_of(RUN_KINDS)} or empty"
        )
    if info.config_json:
        try:
            parsed = loads_bounded(info.config_json)
        except ValueError as exc:
            raise InvalidArgument(f"run.config_json is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidArgument("run.config_json must be a JSON object")
    if len(info.labels) > limits.max_labels:
        raise InvalidArgument(
            f"run.labels has {len(info.labels)} entries; max_labels is {limits.max_labels}"
        )
    for key, value in info.labels.items():
        if len(key) > limits.max_label_key_length or not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"run.labels key {key[:80]!r} is invalid: expected [A-Za-z_][A-Za-z0-9_]* of "
                f"at most max_label_key_length={limits.max_label_key_length} characters"
            )
        if len(value) > limits.max_label_value_length:
            raise InvalidArgument(
                f"run.labels[{key!r}] has {len(value)} characters; "
                f"max_label_value_length is {limits.max_label_value_length}"
            )
    if rank >= limits.max_ranks_per_run:
        raise InvalidArgument(f"rank is {rank}; max_ranks_per_run is {limits.max_ranks_per_run}")
    if info.world_size and rank >= info.world_size:
        raise InvalidArgument(
            f"rank is {rank} but run.world_size is {info.world_size}; ranks are 0..world_size-1"
        )
