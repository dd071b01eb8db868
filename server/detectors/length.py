"""RL: the completion length running away (reward hacking by length) or collapsing."""

from __future__ import annotations

import math
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
    far_below,
)


class RewardWithLengthConfig(DriftConfig):
    """The joint path of :class:`LengthDrift`: the length rising *with* the reward, the mark
    of a reward that pays for length. The mean reward is scored against the run's own level
    (as :class:`~.reward.RewardCollapseConfig`, taken as it is); a record whose length is
    ``length_rise`` above its level and ``length_z`` robust SDs out, while the reward is
    ``reward_z`` robust SDs above its level, counts; the ``records``-th such record in a row
    fires (a run that learns, its reward climbing, may see one long record by chance). In
    the failure corpus' 37 healthy RL runs the length rose (to 1.83 x) while the reward
    stayed level or fell (robust z at most +3 on records 1.1 x or more above the length
    level; +5.2 at most on any record of the GRPO loop); TRL's runs, whose discrete rewards
    jump far, held their length at the token cap. A length hack raised the reward 13-31
    robust SDs from its first record.
    """

    scale: Scale = Scale.LINEAR
    min_scale: float = Field(default=0.01, gt=0.0, description="smallest robust SD, reward units")
    length_rise: float = Field(
        default=0.2, ge=0.0, description="the length at 1.2 x its level or more"
    )
    # 1.5: with 2 a noisy run's length counted only from ~1.5 x its level (the GRPO loop's
    # length noise is ~0.2 in log): the failure corpus' hack, built on a second machine, at
    # 1.35 x and 1.28 x its level (robust z +2.4, +1.7) on its fifth and sixth records fired
    # on its eighth, 7 records after the onset, past the budget of 5; with 1.5 on its sixth
    # (5; tests/test_length_drift.py). The corpus' healthy runs' false alarms stay
    # 0 (0 with no z at all). The price, on seeded streams with that length noise (200
    # each): a run whose reward climbs 0.03 a record (0.21 -> 0.95 in 25) while its length
    # stays level fires 33 times (8 with 2, 107 with 1; none at 0.01 a record), a noisy
    # length hack is caught within 5 records 120 times (59 with 2, 170 with 1)
    length_z: float = Field(default=1.5, ge=0.0, description="and this many robust SDs out")
    reward_z: float = Field(
        default=8.0, gt=0.0, description="while the reward is this many robust SDs up"
    )
    records: int = Field(
        default=2, ge=1, description="consecutive such records (one length outlier never fires)"
    )


class LengthDriftConfig(DriftConfig):
    """Parameters of :class:`LengthDrift` (the log of the mean completion length).

    A drift is sustained: a record adds at most ``z_cap`` robust SDs, so twenty records 3
    robust SDs out fire, never fewer. A healthy RL run's mean length wanders widely: in the
    failure corpus' first 37 healthy RL runs (27 GRPO loop, 10 TRL; 3,693 records) it
    halved for ten steps, and rose to 1.7-1.9 x its level for four to six records in four
    runs; a length hack that doubles the length (to the token cap) looks the same for its first
    records and differs only by staying. So it fires up only at ``1 + min_rise`` x the level
    or more, down only at ``1 - min_fall`` x or less, once the CUSUM passes a high threshold
    (values enter the level clipped at ``clip`` robust SDs, so the level does not follow a
    run away); one record at ``collapse`` x the level or less (empty completions) fires at
    once, and so does one at ``fast_collapse`` x or less that is also ``fast_collapse_z`` robust
    SDs below the level: a length halving every record (the synthetic ``length_collapse``) is
    there on its second halving (0.25-0.29 x, robust z -17 to -28), a record before
    ``collapse``. No healthy record came within 0.38 x (the failure corpus' 37 healthy RL runs:
    rl-healthy-s76 at 0.38 x, robust z -4.7; the lowest robust z, -6.7, at 0.41 x; the
    50,000-step synthetic healthy stream: 0.47 x at z -15). What tells a length hack early is
    the reward rising with the length (``with_reward``): the corpus' hack fires on its fifth
    record (sixth in the second build); by the length alone, whose level follows a length
    pinned at the token cap, on its 25th with a threshold of 24, not in the run's 35 records
    with 40.
    """

    k: float = Field(default=1.0, ge=0.0, description="CUSUM allowance, robust SDs")
    threshold: float = Field(
        default=40.0,
        gt=0.0,
        description="CUSUM decision, robust SDs: twenty records at the cap. A healthy GRPO "
        "run's length wanders to 1.5-1.8 x its level, or falls to 0.4 x, for up to ~18 "
        "records: the failure corpus built on a second machine had three healthy runs past the "
        "former 24 (twelve records): rl-healthy-s12 and s21 wandering to 1.76 x and 1.55 x "
        "(CUSUM 28.0 and 29.6 at most), rl-healthy-s49 falling back to 0.36 x after 40 steps "
        "at the token cap had become its level (35.4); the next healthy run reached 19.8 (the "
        "first build: 16.9). A length that runs away stays there (the CUSUM grows by 2 a "
        "record); a length hack is caught sooner by ``with_reward``, a collapse to empty "
        "completions by ``collapse`` and ``fast_collapse``",
    )
    z_cap: float | None = Field(
        default=3.0, gt=0.0, description="a sustained shift, not one record"
    )
    clip: float = Field(default=2.0, gt=0.0, description="values enter the window clipped here")
    min_rise: float = Field(default=0.5, ge=0.0, description="fire up at 1.5 x the level")
    min_fall: float = Field(default=0.6, ge=0.0, lt=1.0, description="fire down at 0.4 x the level")
    collapse: float | None = Field(
        default=0.25,
        gt=0.0,
        lt=1.0,
        description="one record at or below this x the level fires at once (None: never)",
    )
    fast_collapse: float | None = Field(
        default=0.35,
        gt=0.0,
        lt=1.0,
        description="one record at or below this x the level and ``fast_collapse_z`` robust SDs "
        "below it fires at once (None: never)",
    )
    fast_collapse_z: float = Field(
        default=8.0, gt=0.0, description="robust SDs below the level, ``fast_collapse``"
    )
    min_scale: float = Field(default=0.05, gt=0.0)
    floor: float = Field(default=1.0, ge=0.0, description="tokens: an empty completion is ~1")
    with_reward: RewardWithLengthConfig = RewardWithLengthConfig()


class LengthDrift(DriftDetector):
    """The mean completion length moves far from the run's level, up or down.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = LengthDrift(LengthDriftConfig())
    >>> lengths = [40, 42, 38, 41, 39, 40, 43, 40] * 2 + [50, 62, 80] + [82] * 20
    >>> [(t.step, t.summary) for s, n in enumerate(lengths)
    ...  if (t := det.update(Observation(s, 0.0, completion_length_mean=n)))]
    [(36, 'Completion length running away')]

    The length rising with the reward (a reward that pays for length) fires on the second
    record both are up, far before the length alone:

    >>> det = LengthDrift(LengthDriftConfig())
    >>> rewards = [0.2, 0.21, 0.19, 0.2, 0.22, 0.2, 0.18, 0.2] * 2 + [0.5, 0.6, 0.7]
    >>> [(t.step, t.summary) for s, (n, r) in enumerate(zip(lengths, rewards))
    ...  if (t := det.update(Observation(s, 0.0, completion_length_mean=n, reward_mean=r)))]
    [(17, 'Completion length running away')]
    >>> det = LengthDrift(LengthDriftConfig())
    >>> [(t.step, t.summary) for s, n in enumerate(lengths[:16] + [3])
    ...  if (t := det.update(Observation(s, 0.0, completion_length_mean=n)))]
    [(16, 'Completion length collapsing')]
    """

    name = AlertName.LENGTH_DRIFT
    field = "completion_length_mean"
    what = "mean completion length"
    direction = Direction.BOTH
    summaries: ClassVar[dict[Direction, str]] = {
        Direction.UP: "Completion length running away",
        Direction.DOWN: "Completion length collapsing",
    }
    reasons: ClassVar[dict[Direction, Reason]] = {
        Direction.UP: Reason.ROSE_ABOVE_LEVEL,
        Direction.DOWN: Reason.FELL_BELOW_LEVEL,
    }

    # neither a length nor a reward: update scores nothing and returns None (``_reward_z`` is
    # set at the start of every update and read only within it, by ``pattern``)
    idle_without: ClassVar[tuple[str, ...]] = ("completion_length_mean", "reward_mean")

    def __init__(self, config: LengthDriftConfig) -> None:
        super().__init__(config)
        self.collapse = config.collapse
        self.fast_collapse = config.fast_collapse
        self.fast_collapse_z = config.fast_collapse_z
        self.joint = config.with_reward
        self._reward = RobustStream(self.joint) if self.joint.enabled else None
        self._reward_z: float | None = None  # the latest record's reward robust z
        self._joint_run = 0  # consecutive records of length and reward up together

    def update(self, obs: Observation) -> Transition | None:
        r = obs.reward_mean
        self._reward_z = None
        if self._reward is not None and r is not None and math.isfinite(r):
            score = self._reward.update(r)
            self._reward_z = None if score is None else score.z
        return super().update(obs)

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """A collapse: one record at ``collapse`` x the level or less, or at ``fast_collapse`` x
        and ``fast_collapse_z`` robust SDs below; or a rise with the reward (``with_reward``)."""
        floor = self.config.floor
        if self.collapse is not None and score.value + floor <= self.collapse * score.level:
            return Direction.DOWN, f"collapsed below {self.collapse:g} x its level"
        fast = self.fast_collapse
        if far_below(score.value + floor, score.level, score.z, fast, self.fast_collapse_z):
            return Direction.DOWN, (
                f"collapsing: below {fast:g} x its level, {self.fast_collapse_z:g} robust SDs "
                "or more below it"
            )
        joint, rz = self.joint, self._reward_z
        together = (
            rz is not None
            and rz >= joint.reward_z
            and score.z >= joint.length_z
            and score.value + floor >= (1.0 + joint.length_rise) * score.level
        )
        self._joint_run = self._joint_run + 1 if together else 0
        if rz is not None and self._joint_run >= joint.records:
            return Direction.UP, (
                f"rising with the mean reward (robust z {rz:+.1f}): the reward may pay for length"
            )
        return None
