"""Inversion detectors: weakening (CUSUM on Fisher z) and loss (the CI reaches 0)."""

from __future__ import annotations

import math

from pydantic import Field

from inversion_monitor.server.detectors.base import (
    Z_95,
    AlertName,
    DetectorConfig,
    Observation,
    Reason,
    Severity,
    Transition,
)


class WeakeningConfig(DetectorConfig):
    """CUSUM parameters of :class:`InversionWeakening`."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    warmup: int = Field(default=50, ge=5, description="records that establish the run's level")
    min_shift: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="smallest rise in rho to detect"
    )
    threshold: float = Field(
        default=20.0, gt=0.0, description="CUSUM decision threshold (SE units)"
    )
    max_baseline: float = Field(
        default=0.0,
        gt=-1.0,
        le=1.0,
        description="judge only runs whose established rho is below this: an inversion to "
        "weaken (the toy GRPO runs of the failure corpus settle at rho +0.07 to +0.14 and wander "
        "to +0.5: three false alarms in 37 healthy runs without it)",
    )


class LostConfig(DetectorConfig):
    """Parameters of :class:`InversionLost`."""

    enabled: bool = True
    severity: Severity = Severity.CRITICAL
    warmup: int = Field(default=50, ge=5)
    sustain: int = Field(default=8, ge=1, description="consecutive records with CI upper >= 0")


class InversionWeakening:
    """One-sided CUSUM for a rise of rho above the run's warm-up level.

    >>> det = InversionWeakening(WeakeningConfig(warmup=5, threshold=5.0))
    >>> fired = [det.update(Observation(s, 0.0, -0.5, 256)) for s in range(10)]
    >>> [t for t in fired if t]
    []
    >>> t = next(t for s in range(10, 30) if (t := det.update(Observation(s, 0.0, -0.1, 256))))
    >>> t.name.value, t.firing, t.reason.value
    ('InversionWeakening', True, 'cusum_exceeded')
    """

    name = AlertName.INVERSION_WEAKENING

    def __init__(self, config: WeakeningConfig | None = None) -> None:
        self.config = config or WeakeningConfig()
        self._warm: list[tuple[float, float]] = []  # (z, weight)
        self.baseline_z: float | None = None
        self.cusum = 0.0
        self.active = False
        self._start_step = 0
        # (baseline_z it was made from, rho0, judged, shift): what update reads of the
        # baseline on every record, made once (again if baseline_z changes)
        self._baseline: tuple[float, float, bool, float] | None = None

    def _reference_shift_z(self) -> float:
        """Reference shift in z: half the z-distance of ``min_shift`` from the baseline."""
        assert self.baseline_z is not None
        rho0 = math.tanh(self.baseline_z)
        target = min(0.999, rho0 + self.config.min_shift)
        return (math.atanh(target) - self.baseline_z) / 2.0

    def update(self, obs: Observation) -> Transition | None:
        # obs.usable_rho, obs.z and obs.se inlined (one call per record and run), and
        # min(a, b) / max(a, b) written as (b if b < a else a) / (b if b > a else a)
        rho, n = obs.rho, obs.n
        if rho is None or not math.isfinite(rho) or n <= 3:
            return None
        clipped = rho if rho < 0.999999 else 0.999999
        z = math.atanh(clipped if clipped > -0.999999 else -0.999999)
        se = math.sqrt(1.06 / (n - 3))
        baseline_z = self.baseline_z
        if baseline_z is None:
            self._warm.append((z, 1.0 / se**2))
            if len(self._warm) >= self.config.warmup:
                self.baseline_z, _ = _weighted_mean_z(self._warm)
            return None
        cached = self._baseline
        if cached is None or cached[0] is not baseline_z:
            rho0 = math.tanh(baseline_z)
            judged = not rho0 >= self.config.max_baseline
            cached = (baseline_z, rho0, judged, self._reference_shift_z() if judged else 0.0)
            self._baseline = cached
        _, rho0, judged, shift = cached
        if not judged:
            return None  # no inversion established: nothing to weaken
        h = self.config.threshold
        cusum = self.cusum + (z - baseline_z - shift) / se
        cusum = cusum if cusum > 0.0 else 0.0
        if self.active:
            cap = 2.0 * h  # bounded, so recovery is seen in time
            cusum = cap if cap < cusum else cusum
        self.cusum = cusum
        if (self.active or cusum <= h) and (not self.active or cusum != 0.0):
            return None
        values = {
            "rho": float(obs.rho or 0.0),
            "baseline_rho": rho0,
            "cusum": self.cusum,
            "threshold": h,
            "n": float(obs.n),
        }
        if not self.active and self.cusum > h:
            self.active = True
            self._start_step = obs.step
            return Transition(
                self.name,
                self.config.severity,
                True,
                Reason.CUSUM_EXCEEDED,
                obs.step,
                obs.wall_time,
                "Entropy-gradient inversion weakening",
                f"rho rose from its established level {rho0:.3f} (latest {obs.rho:.3f}, "
                f"n={obs.n}); CUSUM {self.cusum:.1f} > threshold {h:g} at step {obs.step}",
                values,
            )
        if self.active and self.cusum == 0.0:
            self.active = False
            return Transition(
                self.name,
                self.config.severity,
                False,
                Reason.RECOVERED,
                obs.step,
                obs.wall_time,
                "Entropy-gradient inversion back to its level",
                f"rho back near its established level {rho0:.3f} (latest {obs.rho:.3f}, "
                f"n={obs.n}) at step {obs.step}; weakening began at step {self._start_step}",
                values,
            )
        return None


class InversionLost:
    """Critical: the inversion established in the warm-up is gone (CI of rho reaches 0).

    >>> det = InversionLost(LostConfig(warmup=5, sustain=2))
    >>> _ = [det.update(Observation(s, 0.0, -0.5, 256)) for s in range(5)]
    >>> det.update(Observation(5, 0.0, 0.05, 256)) is None
    True
    >>> det.update(Observation(6, 0.0, 0.05, 256)).reason.value
    'ci_reaches_zero'
    """

    name = AlertName.INVERSION_LOST

    def __init__(self, config: LostConfig | None = None) -> None:
        self.config = config or LostConfig()
        self._warm: list[tuple[float, float]] = []
        self.established: bool | None = None
        self.baseline_rho = 0.0
        self.active = False
        self._run = 0

    def update(self, obs: Observation) -> Transition | None:
        rho, n = obs.rho, obs.n  # obs.usable_rho, obs.z and obs.se inlined, as above
        if rho is None or not math.isfinite(rho) or n <= 3:
            return None
        clipped = rho if rho < 0.999999 else 0.999999
        z = math.atanh(clipped if clipped > -0.999999 else -0.999999)
        se = math.sqrt(1.06 / (n - 3))
        if self.established is None:
            self._warm.append((z, 1.0 / se**2))
            if len(self._warm) >= self.config.warmup:
                mean, total = _weighted_mean_z(self._warm)
                self.baseline_rho = math.tanh(mean)
                self.established = mean + Z_95 / math.sqrt(total) < 0.0
            return None
        if not self.established:
            return None
        upper = math.tanh(z + Z_95 * se)
        gone = upper >= 0.0
        self._run = self._run + 1 if gone != self.active else 0
        if self._run < self.config.sustain:
            return None
        self._run = 0
        self.active = gone
        values = {
            "rho": float(obs.rho or 0.0),
            "ci_upper": upper,
            "baseline_rho": self.baseline_rho,
            "n": float(obs.n),
            "sustain": float(self.config.sustain),
        }
        if gone:
            return Transition(
                self.name,
                self.config.severity,
                True,
                Reason.CI_REACHES_ZERO,
                obs.step,
                obs.wall_time,
                "Entropy-gradient inversion lost",
                f"the 95% CI of rho reaches 0 for {self.config.sustain} records (latest rho "
                f"{obs.rho:.3f}, CI upper {upper:.3f}, n={obs.n}); established level was "
                f"{self.baseline_rho:.3f}",
                values,
            )
        return Transition(
            self.name,
            self.config.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            "Entropy-gradient inversion re-established",
            f"the 95% CI of rho is below 0 again for {self.config.sustain} records (latest rho "
            f"{obs.rho:.3f}, CI upper {upper:.3f}, n={obs.n})",
            values,
        )


def _weighted_mean_z(warm: list[tuple[float, float]]) -> tuple[float, float]:
    """Inverse-variance weighted mean of warm-up Fisher z values and the total weight.

    >>> _weighted_mean_z([(0.25, 1.0), (0.5, 3.0)])
    (0.4375, 4.0)
    """
    total = sum(w for _, w in warm)
    return sum(z * w for z, w in warm) / total, total
