"""The contract's words: the values the wire's free-text fields may take, defined once.

``RunInfo.kind`` and ``ComponentStat.projection`` are strings on the wire
(``proto/v1/monitor.proto``); the client (:mod:`inversion_monitor.config`, the
probe) and the server (:mod:`inversion_monitor.server.validate`) both read
their allowed values here. So are the names of ``StepRecord``'s training-health
fields (:data:`HEALTH_FIELDS`): one health record goes out per optimizer step
whatever the probe schedule and may carry only these (no ``inversion``); a
non-finite value travels as itself and is also named in
``StepRecord.nonfinite_fields``, whose entries must be names from
:data:`HEALTH_FIELDS`.

>>> RUN_KINDS, PROJECTIONS
(('sft', 'rl', 'custom'), ('q', 'k', 'v', 'o'))
>>> one_of(PROJECTIONS)
"'q', 'k', 'v', 'o'"
>>> from inversion_monitor.proto.v1 import monitor_pb2
>>> fields = monitor_pb2.StepRecord.DESCRIPTOR.fields_by_name
>>> all(fields[name].type == fields[name].TYPE_DOUBLE for name in HEALTH_FIELDS)
True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

RunKind = Literal["sft", "rl", "custom"]
"""What a run trains: supervised fine-tuning, reinforcement learning, or anything else."""

Projection = Literal["q", "k", "v", "o"]
"""An attention projection: query, key, value or output."""

ProbePrecisionName = Literal["fp32", "bf16-autocast", "fp16-autocast", "bf16", "fp16", "fp64"]
"""What the probe's forward computed in (``StepRecord.probe_precision``): the training
forward's autocast (``"bf16-autocast"``, ``"fp16-autocast"``), or without autocast the
parameters' dtype."""

RUN_KINDS: tuple[RunKind, ...] = get_args(RunKind)
PROJECTIONS: tuple[Projection, ...] = get_args(Projection)
PROBE_PRECISIONS: tuple[ProbePrecisionName, ...] = get_args(ProbePrecisionName)


def one_of(words: Iterable[str]) -> str:
    """``words`` quoted and comma-separated, for an error message."""
    return ", ".join(map(repr, words))


HEALTH_FIELDS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "reward_mean",
    "reward_std",
    "policy_entropy_mean",
    "entropy_covariance",
    "kl",
    "clip_ratio",
    "completion_length_mean",
)
"""Per-step training values taken from the trainer (grad_norm before clipping)."""

RL_HEALTH_FIELDS = HEALTH_FIELDS[3:]
"""The fields only RL runs carry."""
