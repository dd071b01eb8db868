"""RL: the reward collapses below the run's own level (a broken reward, a destabilised policy)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Reason
from inversion_monitor.server.detectors.robust import Direction, DriftConfig, DriftDetector, Scale


class RewardCollapseConfig(DriftConfig):
    """Parameters of :class:`RewardCollapse` (rewards taken as they are: they may be signed).

    Two records 5.5 robust SDs below the level fire, or one 9.5 below (a reward function
    that returns 0: no healthy record of the failure corpus' 37 RL runs came near).
    """

    scale: Scale = Scale.LINEAR
    k: float = Field(default=1.5, ge=0.0, description="CUSUM allowance, robust SDs")
    z_cap: float | None = Field(
        default=10.0, gt=0.0, description="a record adds at most this robust z to the CUSUM"
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
