"""RL: the completion length running away (reward hacking by length) or collapsing."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Reason
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    Score,
)


class LengthDriftConfig(DriftConfig):
    """Parameters of :class:`LengthDrift` (the log of the mean completion length).

    A drift is sustained: a record adds at most ``z_cap`` robust SDs, so eight records 3
    robust SDs out fire, never fewer. A healthy RL run's mean length wanders widely: in the
    failure corpus (27 healthy runs of the GRPO loop, 10 of TRL's, 3,693 healthy records) it
    halved for ten steps, and rose to 1.7-1.9 x its level for four to six records in four
    runs; a length hack that doubles the length (to the token cap) looks the same for its first
    records and differs only by staying. So it fires up only at ``1 + min_rise`` x the level
    or more, down only at ``1 - min_fall`` x or less, once the CUSUM passes a high threshold
    (values enter the level clipped at ``clip`` robust SDs, so the level does not follow a
    run away); one record at ``collapse`` x the level or less (empty completions) fires at
    once.
    """

    k: float = Field(default=1.0, ge=0.0, description="CUSUM allowance, robust SDs")
    threshold: float = Field(default=16.0, gt=0.0, description="CUSUM decision, robust SDs")
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
    min_scale: float = Field(default=0.05, gt=0.0)
    floor: float = Field(default=1.0, ge=0.0, description="tokens: an empty completion is ~1")


class LengthDrift(DriftDetector):
    """The mean completion length moves far from the run's level, up or down.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = LengthDrift(LengthDriftConfig())
    >>> lengths = [40, 42, 38, 41, 39, 40, 43, 40] * 2 + [50, 62, 80] + [82] * 6
    >>> [(t.step, t.summary) for s, n in enumerate(lengths)
    ...  if (t := det.update(Observation(s, 0.0, completion_length_mean=n)))]
    [(24, 'Completion length running away')]
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

    def __init__(self, config: LengthDriftConfig) -> None:
        super().__init__(config)
        self.collapse = config.collapse

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """A collapse: one record at ``collapse`` x the level or less."""
        floor = self.config.floor
        if self.collapse is None or score.value + floor > self.collapse * score.level:
            return None
        return Direction.DOWN, f"collapsed below {self.collapse:g} x its level"
