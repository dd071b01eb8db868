"""The detectors' shared vocabulary: alert names, severities, reasons, inputs and outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

Z_95 = 1.959963984540054


class AlertName(str, Enum):
    INVERSION_WEAKENING = "InversionWeakening"
    INVERSION_LOST = "InversionLost"
    ENTROPY_COLLAPSE = "EntropyCollapse"
    ENTROPY_EXHAUSTION = "EntropyExhaustion"
    MONITOR_STALE = "MonitorStale"
    NON_FINITE_TRAINING = "NonFiniteTraining"
    LOSS_SPIKE = "LossSpike"
    GRAD_NORM_SPIKE = "GradNormSpike"
    REWARD_COLLAPSE = "RewardCollapse"
    ENTROPY_SURGE = "EntropySurge"
    KL_SURGE = "KLSurge"
    LENGTH_DRIFT = "LengthDrift"


class Severity(str, Enum):
    WARNING = "warning"
    CRITICAL = "critical"


class Reason(str, Enum):
    """Why a transition happened."""

    CUSUM_EXCEEDED = "cusum_exceeded"
    CI_REACHES_ZERO = "ci_reaches_zero"
    ENTROPY_BELOW_FRACTION = "entropy_below_fraction"
    ENTROPY_FALLING_FAST = "entropy_falling_fast"
    CEILING_NEAR = "ceiling_near"
    SILENT = "silent"
    ENTROPY_DROPPED_SUDDENLY = "entropy_dropped_suddenly"
    ROSE_ABOVE_LEVEL = "rose_above_level"
    FELL_BELOW_LEVEL = "fell_below_level"
    NON_FINITE = "non_finite"
    RECOVERED = "recovered"
    RUN_CLOSED = "run_closed"


class Observation(NamedTuple):
    """What the detectors and the server read from one record (a named tuple: made once per
    stored record, it must be cheap to build).

    >>> obs = Observation(step=1, wall_time=0.0, rho=-0.5, n=64)
    >>> round(obs.z, 4), round(obs.se, 4)
    (-0.5493, 0.1318)
    """

    step: int
    wall_time: float
    rho: float | None = None
    n: int = 0
    entropy_mean: float | None = None
    # RL runs: mean reward and the policy's mean entropy over completion tokens
    reward_mean: float | None = None
    policy_entropy_mean: float | None = None
    # training health, one record per optimizer step (StepRecord's names); a
    # non-finite value stays NaN/inf here and is named in ``nonfinite_fields``
    loss: float | None = None
    learning_rate: float | None = None
    reward_std: float | None = None
    entropy_covariance: float | None = None
    grad_norm: float | None = None
    kl: float | None = None
    clip_ratio: float | None = None
    completion_length_mean: float | None = None
    nonfinite_fields: tuple[str, ...] = ()
    # the rest of what the server reads of a record once (:mod:`..record_values`): the rank,
    # and the SQL row's statistics as sent (spearman is None only when not sent, rho also
    # when the inversion is ``insufficient``)
    rank: int = 0
    spearman: float | None = None
    pearson: float | None = None
    score_mean: float | None = None

    @property
    def usable_rho(self) -> bool:
        return self.rho is not None and math.isfinite(self.rho) and self.n > 3

    @property
    def z(self) -> float:
        assert self.rho is not None
        return math.atanh(max(-0.999999, min(0.999999, self.rho)))

    @property
    def se(self) -> float:
        """Standard error of the Fisher z of Spearman rho (science.md 1.3)."""
        return math.sqrt(1.06 / (self.n - 3))


@dataclass(frozen=True)
class Transition:
    """An alert starting (``firing=True``) or ending."""

    name: AlertName
    severity: Severity
    firing: bool
    reason: Reason
    step: int
    time: float
    summary: str
    message: str
    values: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- configuration


class DetectorConfig(BaseModel):
    """Base of every detector's settings: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
