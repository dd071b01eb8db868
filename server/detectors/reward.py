"""RL: the reward collapses below the run's own level (a broken reward, a destabilised policy)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Observation, Reason
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    Scale,
    Score,
    far_below,
)


class RewardCollapseConfig(DriftConfig):
    """Parameters of :class:`RewardCollapse` (rewards taken as they are: they may be signed).

    Two records 6.5 robust SDs below the level fire, three 5.2 below, or one 10.5 below (a
    reward function that returns 0: 13 or more robust SDs in the corpus' zero-reward faults).
    The allowance is the CUSUM design rule's half of the smallest fall to catch, 5 robust
    SDs: the GRPO loop's learning-rate jump takes the reward from 0.22 to 0.05-0.08 (robust
    z -7 to -11; the loop's robust SD is ~0.016), while a healthy GRPO run's reward dips
    by ~4 robust SDs for three or four records whenever its completions wander 1.7-1.8 x
    longer (in the failure corpus rl-healthy-s19 at steps 107-109, robust z -3.8, -4.3, -3.3;
    rl-healthy-s32 at steps 30-33, z -3.9, -4.0, -3.8, -3.5). With the former allowance of
    1.5 those dips reached a CUSUM of 7.6 and 9.2 (an alert) of 8; with 2.5, 3.9 and 5.2,
    and a learning-rate jump still fires on the first or second record of its fall.

    The allowance makes the CUSUM blind to a fall smaller than 2.5 robust SDs per record,
    however long it lasts: the demo's GRPO loop (4 problems x 8 samples a step) has a noisy
    mean reward (0.11-0.43 around 0.25, robust SD ~0.09), so its learning-rate jump took the
    reward to ~0 (0.0005-0.009 for 29 records, robust z ~-2.7 each) and the CUSUM never
    passed 1. A reward that was never negative and stays at ``collapse`` x its level or lower
    for ``collapse_records`` records in a row is a collapse whatever the run's noise (no
    healthy record of the failure corpus fell below 0.55 x its run's level).

    One record at ``drop`` x its level or lower *and* ``drop_z`` robust SDs below it fires at
    once: a reward sliding 0.1 a record from ~0.3 (the synthetic ``reward_slide``) is there on
    its second record in 11 of 20 trials (0.06-0.45 x, robust z -5.0 to -10.7), where the
    CUSUM took a record more. Both gates are needed: no healthy record of the failure
    corpus' RL runs came within 0.55 x its level (the lowest, rl-healthy-s76, at robust z
    -4.1; the lowest z, -5.9, at 0.67 x), and a Gaussian reward whose noise is a fifth of
    its level or more is under half of it every few hundred records; there ``drop_z`` 4
    fired 19 times in 60,000 records (a robust SD estimated from 64 records is ~15% off),
    5 fires 4 (0.7 per 10,000), and the second record of the slide is at -3.9 to -5.0 in
    the other nine trials.

    A slide's second record fires at ``slide_z`` (4) robust SDs below the level when it is at
    ``drop`` x the level or lower and the record before it was already ``slide_prev_z`` (1.5)
    robust SDs down: a fall under way, not a lone dip. The synthetic slide's first record is
    at -0.9 to -4.4 robust SDs, its second at 0.06-0.53 x and -3.9 to -10.7: the second record
    fires in 17 of 20 trials (11 with ``drop`` alone), as the static threshold and the
    running-mean rule do. No healthy record of the failure corpus (RL and TRL runs) nor of two
    50,000-step synthetic draws meets it, even at gates of 3 and 0 robust SDs (no healthy
    real record below 0.55 x its level). What it costs is on a reward whose noise is a fifth
    of its level: there ``drop`` fires 6 times in 100,000 records, with this 10 (gates of
    3.5 and 1: 27; 4 and 1: 12; 4.2 and 2: 10, catching a trial fewer).
    """

    scale: Scale = Scale.LINEAR
    k: float = Field(
        default=2.5, ge=0.0, description="CUSUM allowance, robust SDs (half a 5-SD fall)"
    )
    z_cap: float | None = Field(
        default=11.0,
        gt=0.0,
        description="a record adds at most this robust z to the CUSUM (threshold + k + 0.5: "
        "one record 10.5 out fires)",
    )
    min_scale: float = Field(default=0.01, gt=0.0, description="smallest robust SD, reward units")
    collapse: float | None = Field(
        default=0.25,
        gt=0.0,
        lt=1.0,
        description="a non-negative reward at or below this x its level on ``collapse_records`` "
        "records in a row fires, however noisy the run (None: off)",
    )
    collapse_records: int = Field(default=3, ge=1, description="records in a row at ``collapse``")
    drop: float | None = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="one non-negative record at or below this x its level and ``drop_z`` robust "
        "SDs below it fires at once (None: off)",
    )
    drop_z: float = Field(default=5.0, gt=0.0, description="robust SDs below the level, ``drop``")
    slide_z: float | None = Field(
        default=4.0,
        gt=0.0,
        description="a slide's second record: one non-negative record at or below ``drop`` x its "
        "level and this many robust SDs below it fires when the record before was "
        "``slide_prev_z`` robust SDs below the level or more (None: off)",
    )
    slide_prev_z: float = Field(
        default=1.5,
        ge=0.0,
        description="robust SDs below the level, the record before (``slide_z``)",
    )


class RewardCollapse(DriftDetector):
    """The mean reward falls well below the run's level and stays there.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = RewardCollapse(RewardCollapseConfig())
    >>> rewards = [0.40, 0.42, 0.38, 0.41, 0.43, 0.39, 0.41, 0.40] * 2 + [0.0, 0.0]
    >>> [t.reason.value for s, r in enumerate(rewards)
    ...  if (t := det.update(Observation(s, 0.0, reward_mean=r)))]
    ['fell_below_level']
    """

    name = AlertName.REWARD_COLLAPSE
    field = "reward_mean"
    what = "mean reward"
    direction = Direction.DOWN
    summaries: ClassVar[dict[Direction, str]] = {Direction.DOWN: "Reward collapse"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.DOWN: Reason.FELL_BELOW_LEVEL}

    def __init__(self, config: RewardCollapseConfig) -> None:
        super().__init__(config)
        self.collapse_config = config
        self._signed = False  # a negative reward seen: no ratio to the level is meaningful
        self._signed_before = False  # one seen before the current record (``drop`` judges it)
        self._low = 0  # records in a row at ``collapse`` x the level or lower
        self._prev_z = 0.0  # the previous scored record's robust z (``slide_z``)

    def value(self, obs: Observation) -> float | None:
        r = obs.reward_mean
        self._signed_before = self._signed
        if r is not None and r < 0.0:
            self._signed = True
        return r

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """A non-negative reward at ``collapse`` x its level or lower on ``collapse_records``
        records in a row (a fall to ~0 that a noisy run's robust SD hides from the CUSUM), or
        on one record at ``drop`` x its level or lower and ``drop_z`` robust SDs below it."""
        cfg = self.collapse_config
        positive = score.level > 0.0
        if cfg.collapse is None or self._signed or not positive:
            self._low = 0
        else:
            self._low = self._low + 1 if score.value <= cfg.collapse * score.level else 0
        # ``drop`` judges a run whose rewards were never negative before this record: a reward
        # that falls below 0 on it has fallen, not shown itself signed
        prev_z, self._prev_z = self._prev_z, score.z
        if positive and not self._signed_before:
            if far_below(score.value, score.level, score.z, cfg.drop, cfg.drop_z):
                return (
                    Direction.DOWN,
                    f"at {cfg.drop:g} x its level or lower, {cfg.drop_z:g} robust SDs or more "
                    "below it",
                )
            if (
                cfg.slide_z is not None
                and prev_z <= -cfg.slide_prev_z
                and far_below(score.value, score.level, score.z, cfg.drop, cfg.slide_z)
            ):
                return (
                    Direction.DOWN,
                    f"sliding: at {cfg.drop:g} x its level or lower, {cfg.slide_z:g} robust SDs "
                    f"below it, the record before {prev_z:+.1f}",
                )
        if self._low < cfg.collapse_records:
            return None
        return (
            Direction.DOWN,
            f"at {cfg.collapse:g} x its level or lower on {self._low} records in a row",
        )

    def holds(self, score: Score) -> bool:
        """Fired on a collapse: on while the reward stays at ``collapse`` x its level or lower."""
        del score
        return self._low > 0
