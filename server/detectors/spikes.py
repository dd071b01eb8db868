"""Spikes and surges against the run's own level: loss, grad norm (before clipping), KL."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Observation, Reason
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    Scale,
)


class SpikeConfig(DriftConfig):
    """A spike detector's settings: a large allowance, so a healthy drift of a robust SD or two
    per record never adds up; one record 10 robust SDs out fires, or two records 6 out."""

    k: float = Field(default=2.0, ge=0.0)


class LossSpikeConfig(SpikeConfig):
    """Parameters of :class:`LossSpike` (the log of the loss; a signed loss is taken as is)."""

    scale: Scale = Scale.AUTO
    min_scale: float = Field(default=0.03, gt=0.0)


class GradNormSpikeConfig(SpikeConfig):
    """Parameters of :class:`GradNormSpike` (the log of the grad norm).

    A longer warm-up (the first steps' grad norms are a start-up transient: learning-rate
    warm-up, empty optimizer moments; a healthy RL run of the failure corpus spiked 10x at
    step 13) and a higher threshold: grad norms are heavy-tailed, a healthy run's lone
    record 3-4x its level (robust z ~11) is common, so one record fires at 12 robust SDs
    (e.g. 10x a level whose robust SD is 0.2 in log), two records at 7 each.
    """

    warmup: int = Field(default=20, ge=3)
    threshold: float = Field(default=10.0, gt=0.0)
    min_scale: float = Field(default=0.05, gt=0.0)


class KLSurgeConfig(SpikeConfig):
    """Parameters of :class:`KLSurge` (the log of KL + ``floor`` nats: below it KL is ~0).

    A surge is sustained: a record adds at most ``z_cap`` robust SDs (healthy RL runs show
    lone KL records 3-7x their level), so two records 4 robust SDs out fire, and only at
    ``1 + min_rise`` x the level or more (a healthy policy's KL to its reference keeps
    growing: 2.5x over ten steps in the corpus).
    """

    k: float = Field(default=1.5, ge=0.0)
    threshold: float = Field(default=5.0, gt=0.0)
    z_cap: float | None = Field(default=4.5, gt=0.0)
    min_rise: float = Field(default=2.0, ge=0.0)
    floor: float = Field(default=0.01, ge=0.0)
    min_scale: float = Field(default=0.15, gt=0.0)


class LossSpike(DriftDetector):
    """The training loss jumps above the run's level (a bad batch, a learning-rate jump,
    corrupted labels).

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = LossSpike(LossSpikeConfig())
    >>> losses = [2.0, 1.95, 2.02, 1.9, 1.97, 1.93, 1.99, 1.92] * 2 + [5.0]
    >>> [t.step for s, v in enumerate(losses) if (t := det.update(Observation(s, 0.0, loss=v)))]
    [16]
    """

    name = AlertName.LOSS_SPIKE
    field = "loss"
    what = "loss"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "Loss spike"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}


class GradNormSpike(DriftDetector):
    """The gradient norm (before clipping) jumps above the run's level.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = GradNormSpike(GradNormSpikeConfig())
    >>> norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98] * 3 + [30.0]
    >>> [t.message for s, g in enumerate(norms)
    ...  if (t := det.update(Observation(s, 0.0, grad_norm=g)))]  # doctest: +NORMALIZE_WHITESPACE
    ['grad norm 30 is 30 x its level 1 (robust z +66.5; CUSUM 20.0 > 10 robust SDs of this run)
      at step 24']
    """

    name = AlertName.GRAD_NORM_SPIKE
    field = "grad_norm"
    what = "grad norm"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "Gradient norm spike"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}


class KLSurge(DriftDetector):
    """The policy's KL to the reference jumps above the run's level and stays there (RL): two
    records in a row (a lone record never fires it).

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = KLSurge(KLSurgeConfig())
    >>> kls = [0.02, 0.021, 0.019, 0.022, 0.02, 0.023, 0.021, 0.022] * 2 + [0.4, 0.35]
    >>> [t.step for s, v in enumerate(kls) if (t := det.update(Observation(s, 0.0, kl=v)))]
    [17]
    """

    name = AlertName.KL_SURGE
    field = "kl"
    what = "KL"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "KL surge"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}

    def __init__(self, config: KLSurgeConfig) -> None:
        super().__init__(config)
        self._moved = False

    def value(self, obs: Observation) -> float | None:
        # the warm-up starts once the policy has left its reference (KL > 0): a run whose
        # first steps do not move it (all advantages 0) has no KL level to learn yet
        kl = obs.kl
        if kl is not None and not self._moved:
            self._moved = kl > 0.0
        return kl if self._moved else None
