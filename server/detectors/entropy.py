"""Entropy detectors: collapse (below a share of its early level), RL exhaustion (law ceiling)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import ClassVar

from pydantic import Field

from inversion_monitor.server.detectors.base import (
    AlertName,
    DetectorConfig,
    Observation,
    Reason,
    Severity,
    Transition,
)
from inversion_monitor.server.detectors.robust import (
    Direction,
    DriftConfig,
    DriftDetector,
    RobustStream,
    far_below,
)
from inversion_monitor.server.detectors.trend import SlidingSlope
from inversion_monitor.server.entropy_law import EntropyLawTracker


class EntropyDropConfig(DriftConfig):
    """The fast path of :class:`EntropyCollapse`: a sudden fall of the RL policy's entropy.

    Two stages. One record at or below ``collapse`` x the level (a fall to ~0, or
    nearly a halving: no healthy run of the failure corpus fell a third in one step)
    fires on the record that shows it, and so does one at ``steep`` x or below that is also
    ``steep_z`` robust SDs below the level (a halving whose record's noise left it at 0.56 x,
    robust z -14, the synthetic ``entropy_drop``; the failure corpus' lowest healthy record,
    rl-healthy-s70's, is 0.63 x at robust z -6.7; the 50,000-step synthetic healthy stream's
    lowest beyond 0.55 x, 0.67 x at -10.1). A steadier fall: the log of policy entropy +
    ``floor`` nats against the run's own level (:class:`~.robust.RobustStream`,
    downward CUSUM, a record adds at most ``z_cap``) fires when the CUSUM is over the
    threshold and the entropy ``min_drop`` or more below the level on ``confirm``
    records in a row: a healthy RL run's policy entropy wanders by a tenth from step to
    step and drifts further over tens of steps (in the failure corpus' 77 healthy GRPO-loop
    runs it fell 15-28% below its level in several, over five to forty steps: rl-healthy-s70
    fell 27% over ten steps), and such a slow fall charges the CUSUM, after which a lone
    low record (rl-healthy-s49: 0.74 x its level for one record) fired with ``confirm`` 1
    and ``min_drop`` 0.25. The corpus' collapses go to ~0 and fire on ``collapse``.
    """

    floor: float = Field(default=0.01, ge=0.0)
    k: float = Field(default=1.5, ge=0.0)
    threshold: float = Field(default=6.0, gt=0.0)
    min_scale: float = Field(default=0.04, gt=0.0)
    z_cap: float | None = Field(default=6.0, gt=0.0, description="a sustained fall, not one record")
    confirm: int = Field(default=2, ge=1)
    min_drop: float = Field(
        default=0.3, ge=0.0, lt=1.0, description="fire only this fraction or more below the level"
    )
    collapse: float | None = Field(
        default=0.55,
        gt=0.0,
        lt=1.0,
        description="one record at or below this x the level fires at once (None: never)",
    )
    steep: float | None = Field(
        default=0.6,
        gt=0.0,
        lt=1.0,
        description="one record at or below this x the level and ``steep_z`` robust SDs below "
        "it fires at once (None: never)",
    )
    steep_z: float = Field(default=10.0, gt=0.0, description="robust SDs below, ``steep``")


class EntropySurgeConfig(DriftConfig):
    """Parameters of :class:`EntropySurge` (the log of the entropy; a spike detector's large
    allowance, as :class:`~.spikes.SpikeConfig`), only at ``1 + min_rise`` x the level or more:
    a healthy RL run's policy entropy drifts up by a third or more over ten to fifteen records
    (the failure corpus' rl-healthy-s54 to 1.27 x its 64-record level, rl-healthy-s67 to 1.39
    x), which charges the CUSUM, and then a lone record at 1.4-1.47 x fired with
    ``min_rise`` 0.4; a destabilised policy's surge is larger (TRL's learning-rate jump: 1.87
    x), and a surge may last one record only, so no ``confirm`` here."""

    k: float = Field(default=2.0, ge=0.0)
    floor: float = Field(default=0.01, ge=0.0)
    min_scale: float = Field(default=0.05, gt=0.0)
    min_rise: float = Field(default=0.5, ge=0.0, description="fire at 1.5 x the level or more")


class EntropyConfig(DetectorConfig):
    """Parameters of :class:`EntropyCollapse`.

    ``fraction`` judges the smoothed entropy against its early level for the first
    ``horizon`` steps and against its typical level over the last ``horizon`` steps after
    (the median of its means over twenty stretches of them): a healthy RL stream wandering
    slowly (the synthetic healthy stream of ``bench_detection --corpus``'s second draw, 1.23
    nats early to ~0.61 after 10,000 steps) crossed half its early level back and forth, 25
    false alarms in 50,000 steps, and none against the last 1,000 steps; a collapse falls by
    half far sooner. Their highest, the reference before, took a surge's peak: an entropy
    surging to 2.5 x for 30 records and back was "below half its highest" for the next 1,000
    steps. The failure corpus' runs are all shorter than ``horizon`` (the early level
    throughout).
    """

    enabled: bool = True
    severity: Severity = Severity.WARNING
    warmup: int = Field(default=20, ge=1, description="records that establish the early level")
    fraction: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="fire below this x early level"
    )
    horizon: int | None = Field(
        default=1000,
        ge=100,
        description="steps: past this many, ``fraction`` judges the smoothed entropy against its "
        "typical level over the last ``horizon`` steps, not the early level (a fall by half "
        "within them fires, a slower healthy drift does not; None: the early level throughout)",
    )
    max_drop_per_100_steps: float | None = Field(
        default=0.3,
        gt=0.0,
        description="fire when falling faster (fraction of early level / 100 steps)",
    )
    smoothing: float = Field(default=0.1, gt=0.0, le=1.0, description="EWMA weight of a new record")
    sustain: int = Field(default=5, ge=1)
    sudden: EntropyDropConfig = EntropyDropConfig()
    kinds: tuple[str, ...] = Field(
        default=("rl", "custom", ""),
        description="run kinds judged ('' = not given); SFT is left out: entropy falls there "
        "because the model learns",
    )


class ExhaustionConfig(DetectorConfig):
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
    # 80 records (and ``min_drop`` 0.04 per window: the same rate of fall as 0.02 per 40):
    # on long healthy RL-like streams whose reward has plateaued (the detection benchmark's
    # synthetic law: heavy-tailed entropy with a slow wander) the least-squares slope over 40
    # records read a wander, or one outlier near the window's end, as a fall. Eight draws of
    # 30,000 records: 47 starts over 40 records (42 on one draw), 2 over 80. The law's
    # exhausting runs fire on the same records (tests/test_entropy_law.py; bench_detection's
    # 100: all before the reward saturates, 418 records ahead, as with 40); where the entropy
    # plateaus instead (its rows are for information) 49% fire before saturation (67% with
    # 40). The alert fires no earlier than the window's last record.
    trend_window: int = Field(
        default=80, ge=3, description="records over which entropy must be falling"
    )
    falling_t: float = Field(
        default=2.0, gt=0.0, description="fire when the entropy slope is below -this x its SE"
    )
    steady_t: float = Field(
        default=1.0, ge=0.0, description="end when the entropy slope is above -this x its SE"
    )
    min_drop: float = Field(
        default=0.04,
        ge=0.0,
        description="and entropy must fall by at least this fraction of its early level per "
        "trend window (half of it to stay active): noise on a plateau is not a fall",
    )
    sustain: int = Field(default=3, ge=1)


class EntropyCollapse:
    """Mean entropy (EWMA) below ``fraction`` x its early level (past ``horizon`` steps: x its
    typical level over the last ``horizon`` steps), or falling too fast; in RL runs also a
    sudden fall of the policy's entropy (``sudden``, fires at once).

    >>> det = EntropyCollapse(EntropyConfig(warmup=3, smoothing=1.0, sustain=1))
    >>> _ = [det.update(Observation(s, 0.0, entropy_mean=2.0)) for s in range(3)]
    >>> det.update(Observation(3, 0.0, entropy_mean=0.5)).reason.value
    'entropy_below_fraction'

    The fast path: policy entropy steady at ~1.2 nats, then ~0 (a learning-rate jump) fires
    on that record; a fall by a third needs the CUSUM over its threshold on two records in a
    row, three records here (one outlier never fires it, nor a fall by a quarter).

    >>> hs = [1.2, 1.25, 1.18, 1.22, 1.2, 1.19, 1.23, 1.21] * 2
    >>> def fired(tail):
    ...     det = EntropyCollapse()
    ...     return [(t.step, t.reason.value) for s, h in enumerate(hs + tail)
    ...             if (t := det.update(Observation(s, 0.0, policy_entropy_mean=h)))]
    >>> fired([0.02, 0.01])
    [(16, 'entropy_dropped_suddenly')]
    >>> fired([0.8, 1.2]), fired([0.9, 0.88, 0.9]), fired([0.8, 0.78, 0.8])
    ([], [], [(18, 'entropy_dropped_suddenly')])
    """

    name = AlertName.ENTROPY_COLLAPSE

    def __init__(self, config: EntropyConfig | None = None) -> None:
        self.config = config or EntropyConfig()
        self._warm: list[float] = []
        self.early: float | None = None
        self.ewma: float | None = None
        self._history: deque[tuple[int, float]] = deque(maxlen=512)
        self._first: int | None = None  # the first step seen
        # the smoothed entropy's (bucket start, sum, count) per bucket of ``horizon`` / 20
        # steps, over the last horizon
        self._buckets: deque[tuple[int, float, int]] = deque()
        self._typical: float | None = None  # their median, closed ones only (None: to compute)
        self._held: float | None = None  # the reference ``low`` judges against while on
        self.active = False
        self._run = 0
        sudden = self.config.sudden
        self._sudden = RobustStream(sudden) if sudden.enabled else None
        self._sudden_bad = False
        self._sudden_run = 0  # records in a row the CUSUM is over the threshold, far below
        self._sudden_level = 0.0  # the level (nats) the last record was judged against

    def _drop(self, obs: Observation) -> bool:
        """Whether the policy entropy's downward CUSUM is over its threshold (RL runs)."""
        h = obs.policy_entropy_mean
        if self._sudden is None or h is None or not math.isfinite(h):
            return self._sudden_bad
        score = self._sudden.update(h)
        if score is not None:
            cfg = self.config.sudden
            self._sudden_level = level = score.level - cfg.floor
            far = h < (1.0 - cfg.min_drop) * level
            gone = (cfg.collapse is not None and h <= cfg.collapse * level) or far_below(
                h, level, score.z, cfg.steep, cfg.steep_z
            )
            # a fall to ~0 fires on its record; a CUSUM over the threshold on ``confirm``
            # records in a row (far from the level on each); on until the evidence is gone
            self._sudden_run = self._sudden_run + 1 if score.down > cfg.threshold and far else 0
            self._sudden_bad = (
                (gone and far)
                or self._sudden_run >= cfg.confirm
                or (self._sudden_bad and score.down > 0.0)
            )
        return self._sudden_bad

    def _rate(self, step: int, reference: float) -> float | None:
        """Drop of the EWMA over the last ~100 steps, as a fraction of the early level, counted
        from ``reference`` at most: an entropy back at its level after a surge above it has not
        fallen (a surge to 2.5 x for 30 records read "falling fast" ~70 records later)."""
        assert self.early is not None and self.ewma is not None
        history = self._history
        # steps only grow: keep one entry older than 100 steps, the latest such
        while len(history) >= 2 and step - history[1][0] > 100:
            history.popleft()
        if not history or step - history[0][0] <= 100:
            return None
        old_step, old = history[0]
        old = reference if reference < old else old
        return (old - self.ewma) / self.early * 100.0 / max(1, step - old_step)

    def _track(self, step: int) -> None:
        """Keep the smoothed entropy's mean per bucket of ``horizon`` / 20 steps, over the last
        ``horizon`` steps (for :meth:`_reference`)."""
        horizon, ewma, first = self.config.horizon, self.ewma, self._first
        if horizon is None or ewma is None or first is None:
            return
        buckets, width = self._buckets, max(1, horizon // 20)
        bucket = step - (step - first) % width
        if buckets and buckets[-1][0] == bucket:
            last = buckets[-1]
            buckets[-1] = (bucket, last[1] + ewma, last[2] + 1)
        else:
            buckets.append((bucket, ewma, 1))
            self._typical = None
        while buckets[0][0] + width <= step - horizon:
            buckets.popleft()
            self._typical = None

    def _reference(self, step: int) -> float:
        """The level ``fraction`` judges against: the early level within ``horizon`` steps of
        the first record, else the median of the smoothed entropy's means over the stretches
        of the last ``horizon`` steps before the current one (a surge held for under half of
        them does not lift it; computed once a stretch)."""
        assert self.early is not None
        horizon, first, buckets = self.config.horizon, self._first, self._buckets
        if horizon is None or first is None or step - first <= horizon or len(buckets) < 2:
            return self.early
        if self._typical is None:
            closed = [total / n for _, total, n in list(buckets)[:-1]]
            self._typical = statistics.median(closed)
        return self._typical

    def update(self, obs: Observation) -> Transition | None:
        # an RL run's policy entropy (completion tokens, every step) is the collapse signal
        h = obs.policy_entropy_mean if obs.policy_entropy_mean is not None else obs.entropy_mean
        if h is None or not math.isfinite(h):
            return None
        cfg = self.config
        if self._first is None:
            self._first = obs.step
        sudden = self._drop(obs)
        self.ewma = h if self.ewma is None else self.ewma + cfg.smoothing * (h - self.ewma)
        self._track(obs.step)
        if self.early is None:
            self._warm.append(h)
            if len(self._warm) >= cfg.warmup:
                self.early = sum(self._warm) / len(self._warm)
            self._history.append((obs.step, self.ewma))
            if not (sudden and not self.active):
                return None
        early = self.early if self.early is not None else h
        reference = self._reference(obs.step) if self.early is not None else early
        if self.active and self._held is not None:
            reference = self._held  # while on, the level it fell from (no chatter as it slides)
        rate = self._rate(obs.step, reference) if self.early is not None else None
        self._history.append((obs.step, self.ewma))
        if early <= 0.0 and not sudden:
            return None
        low = self.early is not None and self.ewma < cfg.fraction * reference
        fast = (
            cfg.max_drop_per_100_steps is not None
            and rate is not None
            and rate > cfg.max_drop_per_100_steps
        )
        bad = low or fast or sudden
        self._run = self._run + 1 if bad != self.active else 0
        if self._run < cfg.sustain and not (sudden and not self.active):
            return None
        self._run = 0
        self.active = bad
        self._held = reference if bad else None
        values = {
            "entropy_mean": h,
            "entropy_ewma": self.ewma,
            "early_level": early,
            "fraction": cfg.fraction,
            "drop_per_100_steps": rate if rate is not None else 0.0,
        }
        if bad:
            if sudden and self._sudden is not None:
                level = self._sudden_level
                values["sudden_level"] = level
                values["cusum"] = self._sudden.down
                reason = Reason.ENTROPY_DROPPED_SUDDENLY
                sudden_cfg = cfg.sudden
                why = (
                    f"CUSUM {self._sudden.down:.1f} > {sudden_cfg.threshold:g} robust SDs of "
                    "this run"
                    if self._sudden.down > sudden_cfg.threshold
                    else f"{h / level:.2g} x its level, at most {sudden_cfg.collapse:g} x fires "
                    "on one record"
                    if level > 0.0
                    else f"CUSUM {self._sudden.down:.1f}"
                )
                detail = (
                    f"policy entropy {h:.3f} nats fell suddenly from its level {level:.3f} ({why})"
                )
            elif low:
                reason = Reason.ENTROPY_BELOW_FRACTION
                detail = (
                    f"smoothed mean entropy {self.ewma:.3f} nats < {cfg.fraction:g} x early "
                    f"level {early:.3f}"
                    if reference == early
                    else f"smoothed mean entropy {self.ewma:.3f} nats < {cfg.fraction:g} x its "
                    f"level over the last {cfg.horizon} steps, {reference:.3f}"
                )
            else:
                reason = Reason.ENTROPY_FALLING_FAST
                detail = (
                    f"mean entropy falling {rate:.2f} x early level ({early:.3f}) per "
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
            f"smoothed mean entropy {self.ewma:.3f} nats (early level {early:.3f}) "
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
        self._slope = SlidingSlope(self.config.trend_window)  # entropy per step
        self.active = False
        self._run = 0

    def update(self, obs: Observation) -> Transition | None:
        h, r = obs.policy_entropy_mean, obs.reward_mean
        if h is None or r is None or not (math.isfinite(h) and math.isfinite(r)):
            return None
        cfg = self.config
        state = self.tracker.update(obs.step, h, r)
        self._slope.add(obs.step, h)
        if state is None:
            return None
        fit, progress, trend = state.fit, state.progress, self._slope.slope()
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


class EntropySurge(DriftDetector):
    """The entropy jumps above the run's level (the policy's over completion tokens in RL
    runs, the probed token entropy otherwise): a destabilised model spreading its mass.

    >>> det = EntropySurge(EntropySurgeConfig())
    >>> hs = [1.2, 1.25, 1.18, 1.22, 1.2, 1.19, 1.23, 1.21] * 2 + [2.5]
    >>> [(t.step, t.summary) for s, h in enumerate(hs)
    ...  if (t := det.update(Observation(s, 0.0, policy_entropy_mean=h)))]
    [(16, 'Entropy surge')]
    """

    name = AlertName.ENTROPY_SURGE
    field = "policy_entropy_mean"
    what = "entropy"
    direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {Direction.UP: "Entropy surge"}
    reasons: ClassVar[dict[Direction, Reason]] = {Direction.UP: Reason.ROSE_ABOVE_LEVEL}

    # neither entropy (None): value() returns None and picks no source, so update is a no-op
    idle_without: ClassVar[tuple[str, ...]] = ("policy_entropy_mean", "entropy_mean")

    def __init__(self, config: EntropySurgeConfig | None = None) -> None:
        super().__init__(config or EntropySurgeConfig())
        self._source: str | None = None

    def value(self, obs: Observation) -> float | None:
        # one source per run: the policy's entropy once seen (RL), else the token entropy
        if self._source is None:
            if obs.policy_entropy_mean is not None:
                self._source = "policy_entropy_mean"
            elif obs.entropy_mean is not None:
                self._source = "entropy_mean"
            else:
                return None
        value: float | None = getattr(obs, self._source)
        return value
