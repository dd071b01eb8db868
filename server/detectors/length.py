"""RL: the completion length running away (reward hacking by length) or collapsing."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Reason
from inversion_monitor.server.detectors.robust import Direction, DriftConfig, DriftDetector


class LengthDriftConfig(DriftConfig):
    """Parameters of :class:`LengthDrift` (the log of the mean completion length).

    A drift is sustained: a record adds at most ``z_cap`` robust SDs, so three records 2.4
    robust SDs out fire, never fewer. A healthy RL run's mean length wanders widely (in the
    failure corpus it halved for ten steps in two of seven healthy runs, and rose by a
    quarter): it fires up only at ``1 + min_rise`` x the level or more, down only at
    ``1 - min_fall`` x or less (running away, or collapsing towards empty completions).
    """

    k: float = Field(default=1.0, ge=0.0, description="CUSUM allowance, robust SDs")
    threshold: float = Field(default=4.0, gt=0.0, description="CUSUM decision, robust SDs")
    z_cap: float | None = Field(
        default=3.0, gt=0.0, description="a sustained shift, not one record"
    )
    min_rise: float = Field(default=0.3, ge=0.0, description="fire up at 1.3 x the level")
    min_fall: float = Field(default=0.6, ge=0.0, lt=1.0, description="fire down at 0.4 x the level")
    min_scale: float = Field(default=0.05, gt=0.0)
    floor: float = Field(default=1.0, ge=0.0, description="tokens: an empty completion is ~1")


class LengthDrift(DriftDetector):
    """The mean completion length moves far from the run's level, up or down.

    >>> from inversion_monitor.server.detectors import Observation
    >>> det = LengthDrift(LengthDriftConfig())
    >>> lengths = [40, 42, 38, 41, 39, 40, 43, 40] * 2 + [50, 62, 80]
    >>> [(t.step, t.summary) for s, n in enumerate(lengths)
    ...  if (t := det.update(Observation(s, 0.0, completion_length_mean=n)))]
    [(18, 'Completion length running away')]
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
