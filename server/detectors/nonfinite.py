"""A diverged run: a NaN or infinite loss, grad norm or reward, caught on that very record."""

from __future__ import annotations

import math

from pydantic import Field

from inversion_monitor.server.detectors.base import (
    AlertName,
    DetectorConfig,
    Observation,
    Reason,
    Severity,
    Transition,
)
from inversion_monitor.server.detectors.robust import ALL_KINDS


class NonFiniteConfig(DetectorConfig):
    """Parameters of :class:`NonFiniteTraining`."""

    enabled: bool = True
    severity: Severity = Severity.CRITICAL
    kinds: tuple[str, ...] = Field(default=ALL_KINDS, description="run kinds judged")
    fields: tuple[str, ...] = Field(
        default=("loss", "grad_norm", "reward_mean"), description="the health values watched"
    )
    recover: int = Field(
        default=20, ge=1, description="records with every watched value finite that end it"
    )


class NonFiniteTraining:
    """Critical: a watched value is NaN or infinite (or the record names it non-finite).

    Fires on the first such record (no warm-up, no smoothing: a diverged run has
    nothing more to learn); ends after ``recover`` records with every watched
    value finite (a trainer that skipped a bad batch).

    >>> det = NonFiniteTraining()
    >>> det.update(Observation(1, 0.0, loss=2.3, grad_norm=1.1)) is None
    True
    >>> t = det.update(Observation(2, 0.0, loss=2.3, grad_norm=math.inf))
    >>> t.name.value, t.severity.value, t.step, t.message
    ('NonFiniteTraining', 'critical', 2, 'grad_norm is inf at step 2: the run diverged')
    """

    name = AlertName.NON_FINITE_TRAINING

    def __init__(self, config: NonFiniteConfig | None = None) -> None:
        self.config = config or NonFiniteConfig()
        self.active = False
        self._finite_run = 0
        self._start_step = 0

    def update(self, obs: Observation) -> Transition | None:
        cfg = self.config
        if not self.active and not obs.nonfinite_fields:
            # the quiet path (almost every record): nothing named, every watched value
            # finite or missing, not active: no transition, nothing to count
            isfinite = math.isfinite
            for name in cfg.fields:
                value: float | None = getattr(obs, name)
                if value is not None and not isfinite(value):
                    break
            else:
                return None
        bad: dict[str, float] = {}
        seen = False
        for name in cfg.fields:
            value = getattr(obs, name)
            if value is not None:
                seen = True
                if not math.isfinite(value):
                    bad[name] = value
        for name in obs.nonfinite_fields:
            if name in cfg.fields and name not in bad:
                bad[name] = math.nan
        if not seen and not bad:
            return None
        if bad:
            self._finite_run = 0
            if self.active:
                return None
            self.active, self._start_step = True, obs.step
            what = ", ".join(f"{k} is {v}" for k, v in bad.items())
            return Transition(
                self.name,
                cfg.severity,
                True,
                Reason.NON_FINITE,
                obs.step,
                obs.wall_time,
                "Training diverged: non-finite " + ", ".join(bad),
                f"{what} at step {obs.step}: the run diverged",
                {f"{k}_nonfinite": 1.0 for k in bad},
            )
        if not self.active:
            return None
        self._finite_run += 1
        if self._finite_run < cfg.recover:
            return None
        self.active = False
        return Transition(
            self.name,
            cfg.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            "Training values finite again",
            f"{cfg.recover} records with finite {', '.join(cfg.fields)} at step {obs.step}; "
            f"non-finite values began at step {self._start_step}",
            {"finite_records": float(self._finite_run)},
        )
