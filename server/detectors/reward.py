"""RL: the reward collapses below the run's own level (a broken reward, a destabilised policy)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Reason
from inversion_monitor.server.detectors.robust import Direction, DriftConfig, DriftDetector, Scale


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
