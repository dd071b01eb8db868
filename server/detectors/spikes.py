"""Spikes and surges against the run's own level: loss, grad norm (before clipping), KL."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Observation, Reason, Transition
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    RobustStream,
    Scale,
    Score,
)


class SpikeConfig(DriftConfig):
    """A spike detector's settings: a large allowance, so a healthy drift of a robust SD or two
    per record never adds up; one record 10 robust SDs out fires, or two records 6 out."""

    k: float = Field(default=2.0, ge=0.0)


class LossSpikeConfig(SpikeConfig):
    """Parameters of :class:`LossSpike` (the log of the loss; a loss negative in the warm-up
    is a signed surrogate, taken as is and judged for a sustained shift only: a record adds
    at most ``signed_z_cap`` robust SDs, so a shift fires on its third record, a lone
    outlier never)."""

    scale: Scale = Scale.AUTO
    min_scale: float = Field(default=0.03, gt=0.0)
    signed_z_cap: float | None = Field(
        default=6.0, gt=0.0, description="``z_cap`` for a signed loss (None: no cap)"
    )


class GradNormSpikeConfig(SpikeConfig):
    """Parameters of :class:`GradNormSpike` (the log of the grad norm).

    A longer warm-up (the first steps' grad norms are a start-up transient: learning-rate
    warm-up, empty optimizer moments; a healthy RL run of the failure corpus spiked 10x at
    step 13) and a higher threshold: grad norms are heavy-tailed. A lone record never fires
    the CUSUM: two records in a row over the threshold, each at 2x the level or more
    (``confirm`` 2, ``min_rise`` 1; two records ~7 robust SDs up). A healthy run's lone
    records reach 16x its level: the failure corpus built on a second machine had two
    healthy RL runs with one record 13x and 16x theirs (robust z +13 and +16), which the
    one-record cut of 12 robust SDs raised; a learning-rate jump keeps the grad norm up.

    Or one record ``with_loss_z`` robust SDs up when the loss rose as far on the same record,
    the second signal a person on call looks at: a learning-rate jump takes both at once
    (the failure corpus' SFT jump: grad norm 8.9x, robust z +8.6; loss robust z +14), while
    a healthy SFT record's grad-norm outliers come with a loss at its level (the corpus'
    largest: z +5.6 with the loss at +3.9). A signed loss (a policy-gradient surrogate,
    whose outliers follow the grad norm's by construction) corroborates nothing.
    """

    warmup: int = Field(default=20, ge=3)
    threshold: float = Field(default=10.0, gt=0.0)
    confirm: int = Field(default=2, ge=1)
    min_rise: float = Field(default=1.0, ge=0.0)
    min_scale: float = Field(default=0.05, gt=0.0)
    bump_z: float | None = Field(
        default=5.0,
        gt=0.0,
        description="growing spikes: a record this many robust SDs above the level is a bump; "
        "a bump higher than an earlier one within ``bump_window`` records fires (None: off)",
    )
    bump_window: int = Field(default=8, ge=2, description="records a bump is remembered")
    # 6: the failure corpus' healthy RL runs (built on a second machine) raised two growing-
    # spike alarms at bump_z, later bumps at z +5.7 and +5.8 (1.39x and 1.54x an earlier
    # one); the synthetic growing spikes' second spike (x7) is ~13 robust SDs up, and
    # tests/test_grad_norm_spike.py's x3 then x4.5 (x3.2 then x4) at least +6.6
    bump_fire_z: float = Field(
        default=6.0,
        gt=0.0,
        description="the later, higher bump fires only this many robust SDs above the level",
    )
    # 1.2: the synthetic growing spikes (x3 then x7, t5 noise of 0.15 in log) measured a
    # second spike only 1.25 x the first once in 20 trials (a noisy first spike); 1.15 added a
    # false alarm on the failure corpus' healthy RL runs, 1.2 none (2 there either way)
    bump_growth: float = Field(
        default=1.2, gt=1.0, description="a later bump fires at this x the earlier one or more"
    )
    with_loss_z: float | None = Field(
        default=6.0,
        gt=0.0,
        description="a record this many robust SDs above the level fires when a positive loss "
        "(log scale) is this many robust SDs above its own level on the same record (None: off)",
    )


class KLSurgeConfig(SpikeConfig):
    """Parameters of :class:`KLSurge` (the log of KL + ``floor`` nats: below it KL is ~0).

    A surge is sustained: a record adds at most ``z_cap`` robust SDs (healthy RL runs show
    lone KL records 3-7x their level, a few 10x and more), and the alert fires only on the
    second record in a row ``confirm_z`` robust SDs out and ``1 + min_rise`` x the level or
    more, with the CUSUM over the threshold on it: two records ~4 robust SDs out fire. A healthy
    policy's KL climbs steadily (0.45 -> 1.7 nats over 15 steps in the failure corpus'
    rl-healthy-s33), faster than a 64-record median follows, so the CUSUM of such a run sits
    at its bound for tens of records; with ``confirm`` 1 a lone record 3-5x the lagging level
    then fired (four healthy RL runs: s33, s50, s63, s64). With ``confirm`` 2 and the
    threshold lowered from 5 to 3.5 to pay for the second record, the corpus' learning-rate
    jumps fire on the same records as before. The allowance is a spike detector's: a healthy
    policy's KL to its reference keeps growing, by a robust SD or so per record (2.5x over ten
    steps in the GRPO loop; 8x over ten steps in a healthy TRL run of the failure corpus,
    which an allowance of 1.5 added up to an alert).

    A lone record fires at once when the policy entropy confirms it: KL ``with_entropy_kl_z``
    robust SDs up and the entropy ``with_entropy_z`` robust SDs from its own level (either
    way) on the same record. A learning-rate jump moves both (the corpus' TRL jump: KL 22x,
    robust z +6.0, entropy halved, robust z -10); a healthy run's lone KL outliers leave the
    entropy where it was (the corpus' 40 healthy RL records with KL z >= 4: entropy |z| <= 4).
    """

    k: float = Field(default=2.0, ge=0.0)
    threshold: float = Field(default=3.5, gt=0.0)
    confirm: int = Field(default=2, ge=1)
    # 3.5: the failure corpus' GRPO learning-rate jump took KL to 6.1 x its level at robust
    # z +4.5 (CUSUM 2.5), then 23 x (CUSUM 6.5): each record over the threshold fired on the
    # third record, one after a static rule; counting the first fires on the second. False
    # alarms as before (the corpus' healthy runs 1; synthetic healthy streams 0 on four draws)
    confirm_z: float | None = Field(default=3.5, gt=0.0)
    z_cap: float | None = Field(default=6.0, gt=0.0)
    min_rise: float = Field(default=2.0, ge=0.0)
    floor: float = Field(default=0.01, ge=0.0)
    min_scale: float = Field(default=0.15, gt=0.0)
    with_entropy_z: float | None = Field(
        default=6.0,
        gt=0.0,
        description="one record ``with_entropy_kl_z`` robust SDs up and ``1 + min_rise`` x the "
        "level fires at once when the policy entropy moved this many robust SDs (either way) "
        "on the same record (None: off)",
    )
    with_entropy_kl_z: float = Field(default=5.0, gt=0.0)


class LossSpike(DriftDetector):
    """The training loss jumps above the run's level (a bad batch, a learning-rate jump,
    corrupted labels).

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = LossSpike(LossSpikeConfig())
    >>> losses = [2.0, 1.95, 2.02, 1.9, 1.97, 1.93, 1.99, 1.92] * 2 + [5.0]
    >>> [t.step for s, v in enumerate(losses) if (t := det.update(Observation(s, 0.0, loss=v)))]
    [16]
    >>> det = LossSpike(LossSpikeConfig())  # a signed policy loss: a lone record never fires
    >>> losses = [-0.05, 0.04, -0.03, 0.05, -0.04, 0.03, -0.02, 0.05] * 2
    >>> [t.step for s, v in enumerate(losses + [0.8, 0.0, 0.4, 0.4, 0.4])
    ...  if (t := det.update(Observation(s, 0.0, loss=v)))]  # the lone 0.8 not, 0.4s do
    [19]
    """

    name = AlertName.LOSS_SPIKE
    field = "loss"
    what = "loss"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "Loss spike"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}

    def __init__(self, config: LossSpikeConfig) -> None:
        super().__init__(config)
        self._signed_config: DriftConfig | None = config.model_copy(
            update={"z_cap": config.signed_z_cap}
        )

    def update(self, obs: Observation) -> Transition | None:
        # a loss negative in the warm-up (the stream chose the linear scale) is a policy-
        # gradient surrogate, -advantage x ratio (+ beta KL): with group-normalised advantages
        # it hovers at 0, its values in two clusters (+/- 0.05 in the failure corpus' GRPO
        # runs) whose robust SD understates the spread, and its lone outliers come with the
        # grad-norm spikes GradNormSpike reports: a lone healthy record at 0.79, 13 robust
        # SDs up, fired (rl-healthy-s69). Judged for a sustained shift only (z_cap).
        signed = self._signed_config
        if signed is not None and self.stream.log is False:
            self.config = signed
            self.stream.reconfigure(signed)
            self._signed_config = None
        return super().update(obs)


class GradNormSpike(DriftDetector):
    """The gradient norm (before clipping) jumps above the run's level.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = GradNormSpike(GradNormSpikeConfig())
    >>> norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98] * 3 + [30.0, 1.0, 25.0, 28.0]
    >>> [t.message for s, g in enumerate(norms)
    ...  if (t := det.update(Observation(s, 0.0, grad_norm=g)))]  # doctest: +NORMALIZE_WHITESPACE
    ['grad norm 28 is 28 x its level 1 (robust z +46.1; CUSUM 20.0 > 10 robust SDs of this run)
      at step 27']
    """

    name = AlertName.GRAD_NORM_SPIKE
    field = "grad_norm"
    what = "grad norm"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "Gradient norm spike"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}

    # no grad norm (None): value() returns None and changes nothing (the loss's stream learns
    # only from records that carry a grad norm), so update is a no-op
    idle_without: ClassVar[tuple[str, ...]] = ("grad_norm",)

    def __init__(self, config: GradNormSpikeConfig) -> None:
        super().__init__(config)
        self.bump_config = config
        self._bumps: deque[tuple[int, float]] = deque()  # (record index, value) of recent bumps
        self._index = 0
        # the loss's own level and scale, for a grad-norm spike the loss confirms
        self._loss = RobustStream(LossSpikeConfig(warmup=config.warmup))
        self._loss_z: float | None = None  # the loss's robust z on the current record

    def value(self, obs: Observation) -> float | None:
        grad_norm, loss = obs.grad_norm, obs.loss
        score = None
        if (
            grad_norm is not None
            and math.isfinite(grad_norm)
            and loss is not None
            and math.isfinite(loss)
            and self.bump_config.with_loss_z is not None
        ):
            score = self._loss.update(loss)
        self._loss_z = score.z if score is not None and self._loss.log else None
        return grad_norm

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """Growing spikes ("higher and higher"): a bump ``bump_z`` robust SDs or more above
        the level, at ``bump_growth`` x an earlier bump of the last ``bump_window`` records."""
        cfg = self.bump_config
        self._index += 1
        loss_z = self._loss_z
        if (
            cfg.with_loss_z is not None
            and loss_z is not None
            and min(score.z, loss_z) >= (cfg.with_loss_z)
        ):
            return (Direction.UP, f"with the loss {loss_z:+.1f} robust SDs above its level")
        if cfg.bump_z is None or score.z < cfg.bump_z:
            return None
        while self._bumps and self._index - self._bumps[0][0] > cfg.bump_window:
            self._bumps.popleft()
        earlier = [v for _, v in self._bumps if score.value >= cfg.bump_growth * v]
        self._bumps.append((self._index, score.value))
        if not earlier or score.z < cfg.bump_fire_z:
            return None
        return (
            Direction.UP,
            f"growing spikes, {score.value / max(earlier):.3g} x a spike to {max(earlier):.4g} "
            f"{cfg.bump_window} records or fewer before",
        )


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

    # no KL and no policy entropy (None): value() returns None and changes nothing (``_moved``
    # and the entropy's stream stay as they are), so update is a no-op
    idle_without: ClassVar[tuple[str, ...]] = ("kl", "policy_entropy_mean")

    def __init__(self, config: KLSurgeConfig) -> None:
        super().__init__(config)
        self.kl_config = config
        self._moved = False
        # the policy entropy's own level and scale, for a KL jump the entropy confirms
        self._entropy = RobustStream(DriftConfig(scale=Scale.LOG, min_scale=0.03))
        self._entropy_z: float | None = None  # its robust z on the current record

    def value(self, obs: Observation) -> float | None:
        # the warm-up starts once the policy has left its reference (KL > 0): a run whose
        # first steps do not move it (all advantages 0) has no KL level to learn yet
        kl = obs.kl
        h = obs.policy_entropy_mean
        score = None
        if h is not None and math.isfinite(h) and self.kl_config.with_entropy_z is not None:
            score = self._entropy.update(h)
        self._entropy_z = score.z if score is not None else None
        if kl is not None and not self._moved:
            self._moved = kl > 0.0
        return kl if self._moved else None

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """One KL record ``with_entropy_kl_z`` robust SDs up and ``1 + min_rise`` x its level,
        with the policy entropy ``with_entropy_z`` robust SDs from its level on that record."""
        cfg = self.kl_config
        h = self._entropy_z
        if (
            cfg.with_entropy_z is None
            or h is None
            or abs(h) < cfg.with_entropy_z
            or score.z < cfg.with_entropy_kl_z
            or not self._far(Direction.UP, score)
        ):
            return None
        return (Direction.UP, f"with the policy entropy {h:+.1f} robust SDs from its level")
