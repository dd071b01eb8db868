"""Alert detectors over a run's stream of records: pure state machines, no I/O.

Each detector is fed :class:`Observation` values (one per record of the run's
driving rank, in step order) and returns a :class:`Transition` when its alert
starts or ends, ``None`` otherwise. The numbers that decided it travel in
``Transition.values`` and in the message.

- :class:`InversionWeakening` (warning): one-sided CUSUM on the Fisher z of
  Spearman rho, standardised by its standard error sqrt(1.06/(n-3)), against
  the run's own level measured over a warm-up.
- :class:`InversionLost` (critical): the established inversion is gone: the
  upper confidence bound of rho is at or above 0 for ``sustain`` records.
- :class:`EntropyCollapse` (warning): smoothed mean entropy below a fraction
  of its early level, or falling faster than a rate.
- :class:`EntropyExhaustion` (warning, RL runs): the entropy-performance law
  R = -a e^H + b fitted to the run (:mod:`.entropy_law`) says most of its reward
  gain is used (``progress``) while policy entropy keeps falling: the reward
  ceiling is near, before the reward curve shows it.
- :class:`MonitorStale` (warning): an open run silent for ``after_s`` seconds
  (evaluated on a timer with :meth:`MonitorStale.check`).

Detectors know the run kind (``sft``, ``rl``, ``custom``, or empty when the
client did not say): :class:`EntropyCollapse` judges only the kinds in its
``kinds`` setting (not SFT by default: entropy falls there because the model
learns), :class:`EntropyExhaustion` only RL runs (and runs of unknown kind
that send rewards).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from inversion_monitor.server.entropy_law import EntropyLawTracker

Z_95 = 1.959963984540054


class AlertName(str, Enum):
    INVERSION_WEAKENING = "InversionWeakening"
    INVERSION_LOST = "InversionLost"
    ENTROPY_COLLAPSE = "EntropyCollapse"
    ENTROPY_EXHAUSTION = "EntropyExhaustion"
    MONITOR_STALE = "MonitorStale"


class Severity(str, Enum):
    WARNING = "warning"
    CRITICAL = "critical"


class Reason(str, Enum):
    """Why a transition happened."""

    CUSUM_EXCEEDED = "cusum_exceeded"
    CI_REACHES_ZERO = "ci_reaches_zero"
    ENTROPY_BELOW_FRACTION = "entropy_below_fraction"
    ENTROPY_FALLING_FAST = "entropy_falling_fast"
    CEILING_NEAR = "ceiling_near"
    SILENT = "silent"
    RECOVERED = "recovered"
    RUN_CLOSED = "run_closed"


@dataclass(frozen=True)
class Observation:
    """What the detectors read from one record.

    >>> obs = Observation(step=1, wall_time=0.0, rho=-0.5, n=64)
    >>> round(obs.z, 4), round(obs.se, 4)
    (-0.5493, 0.1318)
    """

    step: int
    wall_time: float
    rho: float | None = None
    n: int = 0
    entropy_mean: float | None = None
    # RL runs: mean reward and the policy's mean entropy over completion tokens
    reward_mean: float | None = None
    policy_entropy_mean: float | None = None

    @property
    def usable_rho(self) -> bool:
        return self.rho is not None and math.isfinite(self.rho) and self.n > 3

    @property
    def z(self) -> float:
        assert self.rho is not None
        return math.atanh(max(-0.999999, min(0.999999, self.rho)))

    @property
    def se(self) -> float:
        """Standard error of the Fisher z of Spearman rho (science.md 1.3)."""
        return math.sqrt(1.06 / (self.n - 3))


@dataclass(frozen=True)
class Transition:
    """An alert starting (``firing=True``) or ending."""

    name: AlertName
    severity: Severity
    firing: bool
    reason: Reason
    step: int
    time: float
    summary: str
    message: str
    values: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeakeningConfig(_Strict):
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


class LostConfig(_Strict):
    """Parameters of :class:`InversionLost`."""

    enabled: bool = True
    severity: Severity = Severity.CRITICAL
    warmup: int = Field(default=50, ge=5)
    sustain: int = Field(default=8, ge=1, description="consecutive records with CI upper >= 0")


class EntropyConfig(_Strict):
    """Parameters of :class:`EntropyCollapse`."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    warmup: int = Field(default=20, ge=1, description="records that establish the early level")
    fraction: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="fire below this x early level"
    )
    max_drop_per_100_steps: float | None = Field(
        default=0.3,
        gt=0.0,
        description="fire when falling faster (fraction of early level / 100 steps)",
    )
    smoothing: float = Field(default=0.1, gt=0.0, le=1.0, description="EWMA weight of a new record")
    sustain: int = Field(default=5, ge=1)
    kinds: tuple[str, ...] = Field(
        default=("rl", "custom", ""),
        description="run kinds judged ('' = not given); SFT is left out: entropy falls there "
        "because the model learns",
    )


class ExhaustionConfig(_Strict):
    """Parameters of :class:`EntropyExhaustion`."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    kinds: tuple[str, ...] = Field(default=("rl", ""), description="run kinds judged")
    min_points: int = Field(default=20, ge=5, description="records before the law is trusted")
    min_entropy_range: float = Field(
        default=0.1, gt=0.0, description="nats entropy must have moved before the law is trusted"
    )
    progress: float = Field(
        default=0.7, gt=0.0, lt=1.0, description="fire once this fraction of the gain is used"
    )
    max_relative_se: float = Field(
        default=0.25,
        gt=0.0,
        description="the ceiling's standard error must be below this x the remaining gain range",
    )
    trend_window: int = Field(
        default=40, ge=3, description="records over which entropy must be falling"
    )
    falling_t: float = Field(
        default=2.0, gt=0.0, description="fire when the entropy slope is below -this x its SE"
    )
    steady_t: float = Field(
        default=1.0, ge=0.0, description="end when the entropy slope is above -this x its SE"
    )
    min_drop: float = Field(
        default=0.02,
        ge=0.0,
        description="and entropy must fall by at least this fraction of its early level per "
        "trend window (half of it to stay active): noise on a plateau is not a fall",
    )
    sustain: int = Field(default=3, ge=1)


class StaleConfig(_Strict):
    """Parameters of :class:`MonitorStale`."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    after_s: float = Field(default=600.0, gt=0.0, description="seconds without records")


class AlertsConfig(_Strict):
    """All detector settings; defaults apply without a file.

    >>> AlertsConfig().weakening.min_shift
    0.2
    >>> AlertsConfig.model_validate({"lost": {"sustain": 3}}).lost.sustain
    3
    """

    weakening: WeakeningConfig = WeakeningConfig()
    lost: LostConfig = LostConfig()
    entropy: EntropyConfig = EntropyConfig()
    exhaustion: ExhaustionConfig = ExhaustionConfig()
    stale: StaleConfig = StaleConfig()
    # annotation runbook_url of Alertmanager alerts; {alertname} is substituted
    runbook_url: str = "https://github.com/inversion-monitor/inversion-monitor/blob/main/deploy/runbook.md#{alertname}"
    # seconds between re-sends of active alerts to Alertmanager
    resend_s: float = Field(default=30.0, gt=0.0)


# ---------------------------------------------------------------- detectors


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

    def _k(self) -> float:
        """Reference shift in z: half the z-distance of ``min_shift`` from the baseline."""
        assert self.baseline_z is not None
        rho0 = math.tanh(self.baseline_z)
        target = min(0.999, rho0 + self.config.min_shift)
        return (math.atanh(target) - self.baseline_z) / 2.0

    def update(self, obs: Observation) -> Transition | None:
        if not obs.usable_rho:
            return None
        z, se = obs.z, obs.se
        if self.baseline_z is None:
            self._warm.append((z, 1.0 / se**2))
            if len(self._warm) >= self.config.warmup:
                total = sum(w for _, w in self._warm)
                self.baseline_z = sum(zz * w for zz, w in self._warm) / total
            return None
        k = self._k()
        h = self.config.threshold
        self.cusum = max(0.0, self.cusum + (z - self.baseline_z - k) / se)
        if self.active:
            self.cusum = min(self.cusum, 2.0 * h)  # bounded, so recovery is seen in time
        rho0 = math.tanh(self.baseline_z)
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
        if not obs.usable_rho:
            return None
        z, se = obs.z, obs.se
        if self.established is None:
            self._warm.append((z, 1.0 / se**2))
            if len(self._warm) >= self.config.warmup:
                total = sum(w for _, w in self._warm)
                mean = sum(zz * w for zz, w in self._warm) / total
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


class EntropyCollapse:
    """Mean entropy (EWMA) below ``fraction`` x its early level, or falling too fast.

    >>> det = EntropyCollapse(EntropyConfig(warmup=3, smoothing=1.0, sustain=1))
    >>> _ = [det.update(Observation(s, 0.0, entropy_mean=2.0)) for s in range(3)]
    >>> det.update(Observation(3, 0.0, entropy_mean=0.5)).reason.value
    'entropy_below_fraction'
    """

    name = AlertName.ENTROPY_COLLAPSE

    def __init__(self, config: EntropyConfig | None = None) -> None:
        self.config = config or EntropyConfig()
        self._warm: list[float] = []
        self.early: float | None = None
        self.ewma: float | None = None
        self._history: deque[tuple[int, float]] = deque(maxlen=512)
        self.active = False
        self._run = 0

    def _rate(self, step: int) -> float | None:
        """Drop of the EWMA over the last ~100 steps, as a fraction of the early level."""
        assert self.early is not None and self.ewma is not None
        old = None
        for s, v in self._history:
            if step - s <= 100:
                break
            old = (s, v)
        if old is None:
            return None
        return (old[1] - self.ewma) / self.early * 100.0 / max(1, step - old[0])

    def update(self, obs: Observation) -> Transition | None:
        # an RL run's policy entropy (completion tokens, every step) is the collapse signal
        h = obs.policy_entropy_mean if obs.policy_entropy_mean is not None else obs.entropy_mean
        if h is None or not math.isfinite(h):
            return None
        cfg = self.config
        self.ewma = h if self.ewma is None else self.ewma + cfg.smoothing * (h - self.ewma)
        if self.early is None:
            self._warm.append(h)
            if len(self._warm) >= cfg.warmup:
                self.early = sum(self._warm) / len(self._warm)
            self._history.append((obs.step, self.ewma))
            return None
        rate = self._rate(obs.step)
        self._history.append((obs.step, self.ewma))
        if self.early <= 0.0:
            return None
        low = self.ewma < cfg.fraction * self.early
        fast = (
            cfg.max_drop_per_100_steps is not None
            and rate is not None
            and rate > cfg.max_drop_per_100_steps
        )
        bad = low or fast
        self._run = self._run + 1 if bad != self.active else 0
        if self._run < cfg.sustain:
            return None
        self._run = 0
        self.active = bad
        values = {
            "entropy_mean": h,
            "entropy_ewma": self.ewma,
            "early_level": self.early,
            "fraction": cfg.fraction,
            "drop_per_100_steps": rate if rate is not None else 0.0,
        }
        if bad:
            reason = Reason.ENTROPY_BELOW_FRACTION if low else Reason.ENTROPY_FALLING_FAST
            detail = (
                f"smoothed mean entropy {self.ewma:.3f} nats < {cfg.fraction:g} x early level "
                f"{self.early:.3f}"
                if low
                else f"mean entropy falling {rate:.2f} x early level ({self.early:.3f}) per "
                f"100 steps > {cfg.max_drop_per_100_steps:g}"
            )
            return Transition(
                self.name,
                cfg.severity,
                True,
                reason,
                obs.step,
                obs.wall_time,
                "Entropy collapse",
                f"{detail} at step {obs.step}",
                values,
            )
        return Transition(
            self.name,
            cfg.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            "Entropy no longer collapsing",
            f"smoothed mean entropy {self.ewma:.3f} nats (early level {self.early:.3f}) "
            f"at step {obs.step}",
            values,
        )


class EntropyExhaustion:
    """RL: the fitted law's reward ceiling is near and policy entropy keeps falling.

    Fires when, for ``sustain`` records in a row: the law fit is valid, its
    ceiling is known to within ``max_relative_se`` of the gain range, the run
    has used at least ``progress`` of the law's gain, and the policy entropy's
    least-squares slope over the last ``trend_window`` records is below
    ``-falling_t`` standard errors and loses at least ``min_drop`` of the early
    entropy level per window. Ends when, for ``sustain`` records, the slope is
    above ``-steady_t`` standard errors or loses less than half of ``min_drop``
    (entropy no longer falling), or the fit no longer supports the conclusion
    (hysteresis: noise on a plateau neither starts nor ends it back and forth).

    >>> det = EntropyExhaustion(ExhaustionConfig(min_points=10, sustain=1, trend_window=10))
    >>> hs = [1.5 * math.exp(-s / 25) for s in range(80)]
    >>> obs = [Observation(s, 0.0, reward_mean=1.2 - 0.4 * math.exp(h), policy_entropy_mean=h)
    ...        for s, h in enumerate(hs)]
    >>> t = next(t for o in obs if (t := det.update(o)))
    >>> t.name.value, t.reason.value, t.step, round(t.values["ceiling"], 3)
    ('EntropyExhaustion', 'ceiling_near', 26, 0.8)
    """

    name = AlertName.ENTROPY_EXHAUSTION

    def __init__(self, config: ExhaustionConfig | None = None) -> None:
        self.config = config or ExhaustionConfig()
        self.tracker = EntropyLawTracker(
            min_points=self.config.min_points, min_entropy_range=self.config.min_entropy_range
        )
        self._recent: deque[tuple[int, float]] = deque(maxlen=self.config.trend_window)
        self.active = False
        self._run = 0

    def _trend(self) -> tuple[float, float] | None:
        """Least-squares slope of entropy per step over the window, and its standard error."""
        pts = self._recent
        n = len(pts)
        if n < self.config.trend_window:
            return None
        ms = sum(s for s, _ in pts) / n
        mh = sum(h for _, h in pts) / n
        sxx = sum((s - ms) ** 2 for s, _ in pts)
        if sxx <= 0.0:
            return None
        slope = sum((s - ms) * (h - mh) for s, h in pts) / sxx
        resid = sum((h - mh - slope * (s - ms)) ** 2 for s, h in pts)
        return slope, math.sqrt(resid / (n - 2) / sxx)

    def update(self, obs: Observation) -> Transition | None:
        h, r = obs.policy_entropy_mean, obs.reward_mean
        if h is None or r is None or not (math.isfinite(h) and math.isfinite(r)):
            return None
        cfg = self.config
        state = self.tracker.update(obs.step, h, r)
        self._recent.append((obs.step, h))
        if state is None:
            return None
        fit, progress, trend = state.fit, state.progress, self._trend()
        near = falling = confident = False
        if fit is not None and fit.valid and progress is not None and trend is not None:
            gain = fit.ceiling - fit.reward_at(state.entropy_start)
            confident = gain > 0.0 and fit.ceiling_se <= cfg.max_relative_se * gain
            near = progress >= cfg.progress
            t_limit = cfg.steady_t if self.active else cfg.falling_t
            drop = cfg.min_drop * state.entropy_start * (0.5 if self.active else 1.0)
            falling = trend[0] < -t_limit * trend[1] and -trend[0] * cfg.trend_window >= drop
        bad = confident and near and falling
        self._run = self._run + 1 if bad != self.active else 0
        if self._run < cfg.sustain:
            return None
        self._run = 0
        self.active = bad
        values = {
            "policy_entropy": h,
            "reward": r,
            "progress": progress if progress is not None else math.nan,
            "ceiling": fit.ceiling if fit is not None else math.nan,
            "ceiling_stderr": fit.ceiling_se if fit is not None else math.nan,
            "entropy_slope_per_step": trend[0] if trend is not None else math.nan,
        }
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if bad:
            assert fit is not None and progress is not None and trend is not None
            return Transition(
                self.name,
                cfg.severity,
                True,
                Reason.CEILING_NEAR,
                obs.step,
                obs.wall_time,
                "Entropy exhaustion: reward ceiling near",
                f"the entropy-performance law R = -a e^H + b puts this run's reward ceiling at "
                f"{fit.ceiling:.3f} +/- {fit.ceiling_se:.3f} and {progress:.0%} of its gain is "
                f"used (reward {r:.3f}), while policy entropy keeps falling "
                f"({trend[0]:.2e} nats/step, now {h:.3f}) at step {obs.step}: more reward needs "
                "entropy (e.g. Clip-Cov/KL-Cov, a higher temperature or an entropy bonus)",
                values,
            )
        return Transition(
            self.name,
            cfg.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            "Entropy no longer being exhausted",
            f"policy entropy {h:.3f} no longer falling toward the law's ceiling at step {obs.step}",
            values,
        )


class MonitorStale:
    """An open run that sent nothing for ``after_s`` seconds.

    >>> det = MonitorStale(StaleConfig(after_s=60))
    >>> det.check(now=100.0, last_update=10.0, step=5, open_run=True).firing
    True
    >>> det.check(now=101.0, last_update=100.5, step=6, open_run=True).reason.value
    'recovered'
    """

    name = AlertName.MONITOR_STALE

    def __init__(self, config: StaleConfig | None = None) -> None:
        self.config = config or StaleConfig()
        self.active = False

    def check(self, now: float, last_update: float, step: int, open_run: bool) -> Transition | None:
        silent = now - last_update
        stale = open_run and silent >= self.config.after_s
        if stale == self.active:
            return None
        self.active = stale
        values = {"silent_seconds": silent, "after_seconds": self.config.after_s}
        if stale:
            return Transition(
                self.name,
                self.config.severity,
                True,
                Reason.SILENT,
                step,
                now,
                "Monitor stale",
                f"no records for {silent:.0f} s (limit {self.config.after_s:g} s); "
                f"last step {step}",
                values,
            )
        return Transition(
            self.name,
            self.config.severity,
            False,
            Reason.RECOVERED if open_run else Reason.RUN_CLOSED,
            step,
            now,
            "Monitor no longer stale",
            f"records again at step {step}" if open_run else f"run closed at step {step}",
            values,
        )


class RunDetectors:
    """The record-driven detectors of one run.

    ``kind`` is the run's kind (``"sft"``, ``"rl"``, ``"custom"`` or ``""``):
    the entropy detectors are set up only for the kinds they judge.

    >>> dets = RunDetectors(AlertsConfig(), kind="sft")
    >>> dets.update(Observation(1, 0.0, -0.5, 64, 2.0))
    []
    >>> [type(d).__name__ for d in dets.detectors]
    ['InversionWeakening', 'InversionLost']
    """

    def __init__(self, config: AlertsConfig, kind: str = "") -> None:
        self.kind = kind
        self.detectors: list[
            InversionWeakening | InversionLost | EntropyCollapse | EntropyExhaustion
        ] = []
        if config.weakening.enabled:
            self.detectors.append(InversionWeakening(config.weakening))
        if config.lost.enabled:
            self.detectors.append(InversionLost(config.lost))
        if config.entropy.enabled and kind in config.entropy.kinds:
            self.detectors.append(EntropyCollapse(config.entropy))
        if config.exhaustion.enabled and kind in config.exhaustion.kinds:
            self.detectors.append(EntropyExhaustion(config.exhaustion))
        self.stale = MonitorStale(config.stale) if config.stale.enabled else None

    def update(self, obs: Observation) -> list[Transition]:
        return [t for det in self.detectors if (t := det.update(obs)) is not None]
