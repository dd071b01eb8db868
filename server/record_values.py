"""A stored record's values, read once into plain Python values (an :class:`Observation`).

Reading a protobuf field costs about as much as a few lines of Python, asking whether
one was sent (``HasField``) more, so the server reads each field of a record once:
:func:`plain_values` checks a record and reads its values in one pass when every value
is finite and in range (nothing to clear or clamp, the common case);
:func:`read_values` reads a record the field-by-field check has sanitised. What they
return feeds the SQL row, the alert detectors and the entropy-law tracker (listeners
with ``on_values``, :mod:`.listeners`), none of which reads the record again.

An optional double reads 0 when it was not sent: a value that is not 0 (NaN included)
was sent, one that reads 0 is asked (``name in message``, the same as ``HasField``).
"""

from __future__ import annotations

import sys

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import PROBE_PRECISIONS, PROJECTIONS
from inversion_monitor.server.config import Limits
from inversion_monitor.server.detectors.base import Observation

__all__ = ["MAX_REASON_LENGTH", "WIRE_PROJECTIONS", "Observation", "plain_values", "read_values"]

_MAX = sys.float_info.max
MAX_REASON_LENGTH = 256
WIRE_PROJECTIONS = frozenset(PROJECTIONS)
_make = Observation._make


def read_values(record: monitor_pb2.StepRecord) -> Observation:
    """The values of a record as it is (missing statistics stay None, NaN stays NaN).

    >>> rec = monitor_pb2.StepRecord(step=3, wall_time=1.5, rank=1)
    >>> rec.inversion.spearman.value = -0.4; rec.inversion.n = 64; rec.entropy.mean = 2.0
    >>> rec.grad_norm = float("nan"); rec.nonfinite_fields.append("grad_norm")
    >>> v = read_values(rec)
    >>> v.rho, v.n, v.entropy_mean, v.reward_mean, v.grad_norm, v.nonfinite_fields, v.rank
    (-0.4, 64, 2.0, None, nan, ('grad_norm',), 1)
    """
    # the probe statistics (most often sent when the inversion is) are read first and asked
    # only when they read 0, the health doubles (most often not sent with them) asked first
    inv = record.inversion
    sp = inv.spearman
    v = sp.value
    spearman = v if v or "value" in sp else None
    pe = inv.pearson
    v = pe.value
    pearson = v if v or "value" in pe else None
    en = record.entropy
    v = en.mean
    entropy = v if v or "mean" in en else None
    sc = record.score
    v = sc.mean
    score_mean = v if v or "mean" in sc else None
    return _make(
        (
            record.step,
            record.wall_time,
            None if inv.insufficient else spearman,
            inv.n,
            entropy,
            record.reward_mean if "reward_mean" in record else None,
            record.policy_entropy_mean if "policy_entropy_mean" in record else None,
            record.loss if "loss" in record else None,
            record.learning_rate if "learning_rate" in record else None,
            record.reward_std if "reward_std" in record else None,
            record.entropy_covariance if "entropy_covariance" in record else None,
            record.grad_norm if "grad_norm" in record else None,
            record.kl if "kl" in record else None,
            record.clip_ratio if "clip_ratio" in record else None,
            record.completion_length_mean if "completion_length_mean" in record else None,
            tuple(record.nonfinite_fields),
            record.rank,
            spearman,
            pearson,
            score_mean,
        )
    )


def plain_values(record: monitor_pb2.StepRecord, limits: Limits) -> Observation | None:
    """The record's values when every field is finite and in range, so nothing needs clearing
    or clamping; None otherwise (the field-by-field check decides, and gives the same result
    for the records this passes: tested).

    Unset fields read as 0, which is in every range; a chained comparison is False for NaN,
    so one test covers finiteness and range.

    >>> rec = monitor_pb2.StepRecord(step=3, wall_time=5.0, loss=0.0)
    >>> rec.entropy.mean = 2.5
    >>> v = plain_values(rec, Limits())
    >>> v.step, v.wall_time, v.entropy_mean, v.score_mean, v.loss, v.kl
    (3, 5.0, 2.5, None, 0.0, None)
    >>> rec.kl = float("nan")
    >>> plain_values(rec, Limits()) is None
    True
    """
    inv = record.inversion
    sp = inv.spearman
    pe = inv.pearson
    en = record.entropy
    sc = record.score
    step = record.step
    wall_time = record.wall_time
    rho = sp.value
    pearson = pe.value
    entropy_mean = en.mean
    score_mean = sc.mean
    n = inv.n
    insufficient = inv.insufficient
    entropy_covariance = record.entropy_covariance
    loss = record.loss
    learning_rate = record.learning_rate
    reward_mean = record.reward_mean
    reward_std = record.reward_std
    policy_entropy_mean = record.policy_entropy_mean
    grad_norm = record.grad_norm
    kl = record.kl
    clip_ratio = record.clip_ratio
    completion_length_mean = record.completion_length_mean
    if not (
        step >= 0
        and 0.0 < wall_time <= _MAX
        and -1.0 <= rho <= 1.0
        and -1.0 <= sp.ci_low <= 1.0
        and -1.0 <= sp.ci_high <= 1.0
        and -1.0 <= pearson <= 1.0
        and -1.0 <= pe.ci_low <= 1.0
        and -1.0 <= pe.ci_high <= 1.0
        and 0.0 <= inv.confidence < 1.0
        and len(inv.insufficient_reason) <= MAX_REASON_LENGTH
        and 0.0 <= entropy_mean <= _MAX
        and 0.0 <= en.p10 <= _MAX
        and 0.0 <= en.p50 <= _MAX
        and 0.0 <= en.p90 <= _MAX
        and 0.0 <= score_mean <= _MAX
        and 0.0 <= sc.p10 <= _MAX
        and 0.0 <= sc.p50 <= _MAX
        and 0.0 <= sc.p90 <= _MAX
        and -_MAX <= entropy_covariance <= _MAX
        and -_MAX <= loss <= _MAX
        and 0.0 <= learning_rate <= _MAX
        and 0.0 <= record.probe_seconds <= _MAX
        and -1.0 <= record.spearman_per_token_type <= 1.0
        and -_MAX <= reward_mean <= _MAX
        and 0.0 <= reward_std <= _MAX
        and 0.0 <= policy_entropy_mean <= _MAX
        and 0.0 <= grad_norm <= _MAX
        and -_MAX <= kl <= _MAX
        and 0.0 <= clip_ratio <= 1.0
        and 0.0 <= completion_length_mean <= _MAX
        and not record.nonfinite_fields
        and (record.probe_precision in PROBE_PRECISIONS or "probe_precision" not in record)
        and _rl_summaries_plain(record)
        and not record.samples
    ):
        return None
    components = record.components
    if components:
        if len(components) > limits.max_components:
            return None
        for comp in components:
            if not (
                comp.projection in WIRE_PROJECTIONS
                and -1.0 <= comp.spearman <= 1.0
                and 0.0 <= comp.score_mean <= _MAX
            ):
                return None
    # every value is finite: one that is not 0 was sent, one that reads 0 is asked
    spearman = rho if rho or "value" in sp else None
    return _make(
        (
            step,
            wall_time,
            None if insufficient else spearman,
            n,
            entropy_mean if entropy_mean or "mean" in en else None,
            reward_mean if reward_mean or "reward_mean" in record else None,
            policy_entropy_mean if policy_entropy_mean or "policy_entropy_mean" in record else None,
            loss if loss or "loss" in record else None,
            learning_rate if learning_rate or "learning_rate" in record else None,
            reward_std if reward_std or "reward_std" in record else None,
            entropy_covariance if entropy_covariance or "entropy_covariance" in record else None,
            grad_norm if grad_norm or "grad_norm" in record else None,
            kl if kl or "kl" in record else None,
            clip_ratio if clip_ratio or "clip_ratio" in record else None,
            completion_length_mean
            if completion_length_mean or "completion_length_mean" in record
            else None,
            (),
            record.rank,
            spearman,
            pearson if pearson or "value" in pe else None,
            score_mean if score_mean or "mean" in sc else None,
        )
    )


def _rl_summaries_plain(record: monitor_pb2.StepRecord) -> bool:
    if not ("policy_entropy" in record or "advantage" in record):
        return True
    pe = record.policy_entropy
    ad = record.advantage
    return (
        0.0 <= pe.mean <= _MAX
        and 0.0 <= pe.p10 <= _MAX
        and 0.0 <= pe.p50 <= _MAX
        and 0.0 <= pe.p90 <= _MAX
        and -_MAX <= ad.mean <= _MAX
        and -_MAX <= ad.p10 <= _MAX
        and -_MAX <= ad.p50 <= _MAX
        and -_MAX <= ad.p90 <= _MAX
    )
