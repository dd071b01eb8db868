"""RL: the completion length running away (reward hacking by length) or collapsing."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import AlertName, Reason
from inversion_monitor.server.detectors.robust import Direction, DriftConfig, DriftDetector


class LengthDriftConfig(DriftConfig):
    """Parameters of :class:`LengthDrift` (the log of the mean completion length)."""

    k: float = Field(default=1.5, ge=0.0, description="CUSUM allowance, robust SDs")
    z_cap: float | None = Field(
        default=6.0, gt=0.0, description="a sustained shift, not one record"
    )
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
