"""Self-calibrating change detection on one stream of a run: robust level and scale, CUSUM.

The run is its own reference. After ``warmup`` records, each new value (its log
for positive quantities such as loss, grad norm, KL, length or entropy) is
scored against the median and the MAD of the last ``window`` accepted values:
z = (y - median) / max(1.4826 MAD, min_scale). Two one-sided CUSUMs on that
robust z (allowance ``k``) accumulate evidence upward and downward; a detector
fires when the one it watches passes ``threshold``. A single record ``threshold
+ k`` scales out fires at once (a spike); a smaller sustained shift of d scales
fires after about ``threshold / (d - k)`` records. ``z_cap`` bounds what one record adds
(a sustained shift, never a lone outlier), ``min_rise``/``min_fall`` ask a log stream to be
a given ratio from its level as well (a shift the run's own noise makes plain, yet smaller
than its healthy wander, does not fire). Values enter the window
clipped to ``clip`` scales, so a fault does not become the run's new normal
within a few records, while a slow healthy drift is followed. While a detector's
alert is on, its stream scores without learning: the fault is judged against the
level it left for as long as it lasts, and the alert ends when the value is back
there (the CUSUM at 0, or ``back_records`` records within ``back_z`` scales), not
when the window has filled with the fault. Nothing is set per run: the level and
the scale are the run's own.

Each alert of this kind (:mod:`.spikes`, :mod:`.reward`, :mod:`.length`, the
surge and fast-collapse parts of :mod:`.entropy`) is a :class:`DriftDetector`
naming the :class:`~.base.Observation` field it watches and the direction.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from enum import Enum
from typing import ClassVar, NamedTuple

from pydantic import Field, model_validator

from inversion_monitor.server.detectors.base import (
    AlertName,
    DetectorConfig,
    Observation,
    Reason,
    Severity,
    Transition,
)

MAD_TO_SD = 1.4826
ALL_KINDS: tuple[str, ...] = ("sft", "rl", "custom", "")


class Scale(str, Enum):
    """How values are scored: their log (positive quantities), as they are, or the log when
    every warm-up value is positive (a loss that may be signed, as an RL policy loss)."""

    LOG = "log"
    LINEAR = "linear"
    AUTO = "auto"


class Direction(str, Enum):
    UP = "up"
    DOWN = "down"
    BOTH = "both"


class DriftConfig(DetectorConfig):
    """Settings shared by the self-calibrating detectors (each has its own defaults)."""

    enabled: bool = True
    severity: Severity = Severity.WARNING
    kinds: tuple[str, ...] = Field(default=ALL_KINDS, description="run kinds judged")
    scale: Scale = Scale.LOG
    floor: float = Field(
        default=0.0, ge=0.0, description="added before the log: values this small count as ~0"
    )
    warmup: int = Field(default=12, ge=3, description="records before the level is trusted")
    window: int = Field(default=64, ge=3, description="recent records the level comes from")
    k: float = Field(default=1.0, ge=0.0, description="CUSUM allowance, robust SDs per record")
    threshold: float = Field(default=8.0, gt=0.0, description="CUSUM decision, robust SDs")
    min_scale: float = Field(
        default=0.05, gt=0.0, description="smallest robust SD (log units: a relative change)"
    )
    min_rise: float = Field(
        default=0.0,
        ge=0.0,
        description="log streams: fire upward only at (1 + this) x the level or more (0: any)",
    )
    min_fall: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="log streams: fire downward only at (1 - this) x the level or less (0: any)",
    )
    clip: float = Field(default=3.0, gt=0.0, description="values enter the window clipped here")
    confirm: int = Field(
        default=1,
        ge=1,
        description="records in a row the CUSUM must be over the threshold and the value "
        "min_rise/min_fall from the level before the alert fires (2: a lone record never "
        "fires it, even after a slow healthy drift has charged the CUSUM)",
    )
    confirm_z: float | None = Field(
        default=None,
        gt=0.0,
        description="with ``confirm`` > 1: a record counts toward it when it is min_rise/"
        "min_fall from the level and this many robust SDs out, the CUSUM over the threshold "
        "on the last of them only (None: the CUSUM over the threshold on each)",
    )
    z_cap: float | None = Field(
        default=None,
        gt=0.0,
        description="a record adds at most this robust z to the CUSUM: a sustained shift needs "
        "two records or more, a single outlier never fires it (None: no cap, spikes fire)",
    )
    back_records: int = Field(
        default=10,
        ge=1,
        description="an alert on ends once the watched CUSUM is back at 0, or once this many "
        "records in a row are within ``back_z`` robust SDs of the level it left (a CUSUM at "
        "its bound of 2 x ``threshold`` falls by only ``k`` a record)",
    )
    back_z: float = Field(
        default=2.0, gt=0.0, description="robust SDs from the level it left, ``back_records``"
    )

    @model_validator(mode="after")
    def _gates_need_ratios(self) -> DriftConfig:
        if self.scale is Scale.LINEAR and (self.min_rise or self.min_fall):
            raise ValueError(
                "min_rise and min_fall are ratios to the level: they need scale 'log' or 'auto' "
                "(set them to 0 for a linear stream)"
            )
        return self


class Score(NamedTuple):
    """One scored value: its robust z against the run's level, and both CUSUMs after it
    (a named tuple: one per record and stream, cheap to build)."""

    value: float
    level: float
    z: float
    up: float
    down: float


def far_below(value: float, level: float, z: float, ratio: float | None, min_z: float) -> bool:
    """The one-record gate of RewardCollapse (``drop``), LengthDrift (``fast_collapse``) and
    EntropyCollapse (``steep``): ``value`` at ``ratio`` x ``level`` or lower *and* its robust
    ``z`` ``min_z`` SDs or more below the level (either alone fires on healthy noise: a noisy
    run's record at half its level, a quiet run's record many SDs yet a few percent down).
    ``ratio`` None: off. Callers pass the value and the level as their stream compares them
    (with its ``floor`` where it has one).

    >>> far_below(0.1, 0.4, -6.0, 0.5, 5.0), far_below(0.1, 0.4, -4.0, 0.5, 5.0)
    (True, False)
    >>> far_below(0.3, 0.4, -9.0, 0.5, 5.0), far_below(0.1, 0.4, -9.0, None, 5.0)
    (False, False)
    """
    return ratio is not None and value <= ratio * level and z <= -min_z


class RobustStream:
    """Robust z-scores and two-sided CUSUM of one stream (pure state, no I/O).

    >>> s = RobustStream(DriftConfig(warmup=4, scale=Scale.LINEAR, min_scale=0.1))
    >>> [s.update(v) for v in (1.0, 1.1, 0.9, 1.0)]
    [None, None, None, None]
    >>> sc = s.update(3.0)
    >>> round(sc.level, 3), round(sc.z, 1), round(sc.up, 1), sc.down
    (1.0, 20.0, 16.0, 0.0)
    """

    def __init__(self, config: DriftConfig) -> None:
        self._window: deque[float] = deque(maxlen=config.window)
        self._sorted: list[float] = []  # the window's values in order
        self._warm: list[float] = []
        self.log: bool | None = None if config.scale is Scale.AUTO else config.scale is Scale.LOG
        self.up = 0.0
        self.down = 0.0
        self._split = -1  # the MAD's split at the last update (a hint for the next)
        self.reconfigure(config)

    def reconfigure(self, config: DriftConfig) -> None:
        """Score the next values under ``config`` (the same ``window`` and ``scale``: the
        window and the scale already chosen are kept)."""
        self.config = config
        # the settings update reads on every record, read once (the config is frozen)
        self._params = (
            config.floor,
            config.warmup,
            config.min_scale,
            config.z_cap,
            config.k,
            config.clip,
            2.0 * config.threshold,  # the CUSUMs' bound, so the end of a fault is seen in time
        )

    def _y(self, x: float) -> float:
        if self.log:
            return math.log(max(x, 0.0) + self.config.floor + 1e-12)
        return x

    def _push(self, y: float) -> None:
        """Add ``y`` to the window (and its sorted copy), dropping the oldest when full."""
        if len(self._window) == self._window.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._window[0])]
        self._window.append(y)
        bisect.insort(self._sorted, y)

    def update(self, x: float, *, learn: bool = True) -> Score | None:
        """Score a finite value; None while warming up. ``learn`` False: score it without
        adding it to the window (the level and scale stay those it is judged against)."""
        cfg = self.config
        if self.log is None:
            self._warm.append(x)
            if len(self._warm) < cfg.warmup:
                return None
            self.log = min(self._warm) > 0.0
            for v in self._warm:
                self._push(self._y(v))
            return None
        # one call per record and stream: _y, the window's median and MAD and _push inlined,
        # and max(a, b) / min(a, b) written as (b if b > a else a) / (b if b < a else a), what
        # the builtins return (the same arithmetic, without their calls)
        floor, warmup, min_scale, z_cap, k, clip, cap = self._params
        log = self.log
        y = math.log((0.0 if x < 0.0 else x) + floor + 1e-12) if log else x
        ys = self._sorted
        n = len(ys)
        if n < warmup:
            self._push(y)
            return None
        mid = n // 2
        level = ys[mid] if n % 2 else 0.5 * (ys[mid - 1] + ys[mid])
        mad, self._split = _mad_split(ys, level, self._split)
        scale = MAD_TO_SD * mad
        scale = min_scale if min_scale > scale else scale
        z = (y - level) / scale
        zc = z
        if z_cap is not None:
            zc = z if z < z_cap else z_cap
            zc = zc if zc > -z_cap else -z_cap
        up = self.up + zc - k
        up = up if up > 0.0 else 0.0
        self.up = up = up if up < cap else cap
        down = self.down - zc - k
        down = down if down > 0.0 else 0.0
        self.down = down = down if down < cap else cap
        if learn:
            zw = z if z < clip else clip
            zw = zw if zw > -clip else -clip
            window = self._window
            if len(window) == window.maxlen:
                del ys[bisect.bisect_left(ys, window[0])]
            y = level + zw * scale
            window.append(y)
            bisect.insort(ys, y)
        return Score(x, math.exp(level) if log else level, z, up, down)


def times(ratio: float) -> str:
    """A ratio as a message prints it: three significant digits, whole numbers from 100.

    >>> times(1.5312), times(355.3), times(1001.5)
    ('1.53', '355', '1002')
    """
    return f"{ratio:.0f}" if abs(ratio) >= 100.0 else f"{ratio:.3g}"


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _mad(ys: list[float], med: float) -> float:
    """Median absolute deviation of sorted ``ys`` from ``med`` in O(log n), without sorting:
    the deviations below and above ``med`` are two sorted runs; their k-th smallest is found
    by bisecting how many come from each (tests/test_health_detectors.py checks it against
    sorting).

    >>> ys = [1.0, 2.0, 4.0, 7.0, 11.0]
    >>> _mad(ys, 4.0), _median(sorted(abs(y - 4.0) for y in ys))
    (3.0, 3.0)
    """
    return _mad_split(ys, med, -1)[0]


def _mad_split(ys: list[float], med: float, hint: int) -> tuple[float, int]:
    """:func:`_mad` and how many of the middle deviations lie below ``med`` (the split).

    ``hint``: the split of the previous call on a window one value apart (a stream's
    update), or -1. The split is the first ``i`` where "the ``i``-th deviation below is
    not the smaller" holds, a condition false up to it and true from it on; from a hint it
    is found by stepping (one or two steps in a stream), else by bisection: the same ``i``
    either way, so the same MAD (tests/test_detector_fast_paths.py checks every hint).
    """
    n = len(ys)
    p = bisect.bisect_left(ys, med)
    a, b = p, n - p  # deviations below: med - ys[p-1-i]; above: ys[p+j] - med
    # take the m smallest deviations (the middle one, or the lower of the middle two); find
    # how many of them are below
    m = n // 2 + 1 if n % 2 else n // 2
    lo, hi = m - b if m - b > 0 else 0, m if m < a else a
    # more(i): the i-th deviation below is larger than the (m - i)-th above, so more than i
    # come from below (False at hi: then i == a or m - i == 0)
    if hint < 0:
        while lo < hi:
            i = (lo + hi) // 2
            j = m - i
            if j > 0 and i < a and ys[p + j - 1] - med > med - ys[p - 1 - i]:
                lo = i + 1
            else:
                hi = i
    else:
        i = hint if hint < hi else hi
        i = i if i > lo else lo
        j = m - i
        if j > 0 and i < a and ys[p + j - 1] - med > med - ys[p - 1 - i]:  # more(i): go up
            i += 1
            j -= 1
            while j > 0 and i < a and ys[p + j - 1] - med > med - ys[p - 1 - i]:
                i += 1
                j -= 1
        else:  # go down while more(i - 1) is false
            while i > lo and not (ys[p + j] - med > med - ys[p - i]):
                i -= 1
                j += 1
        lo = i
    j = m - lo
    below = med - ys[p - lo] if lo > 0 else -math.inf
    above = ys[p + j - 1] - med if j > 0 else -math.inf
    largest_taken = above if above > below else below
    if n % 2:
        return largest_taken, lo
    # the upper middle one: the smallest deviation not taken, next below or next above
    next_below = med - ys[p - 1 - lo] if lo < a else math.inf
    next_above = ys[p + j] - med if j < b else math.inf
    return 0.5 * (largest_taken + (next_above if next_above < next_below else next_below)), lo


class DriftDetector:
    """An alert on one Observation field moving away from the run's own level.

    Subclasses set ``name``, ``field``, ``direction``, ``what`` (words for the
    quantity) and ``summaries`` (alert summary by direction). Fires when the
    CUSUM of the watched direction passes the threshold; ends when it is back
    to 0 (values at the level again for a while).
    """

    name: AlertName
    field: str
    what: str
    direction: Direction = Direction.UP
    summaries: ClassVar[dict[Direction, str]] = {}
    reasons: ClassVar[dict[Direction, Reason]] = {}

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.stream = RobustStream(config)
        self.active = False
        self.side: Direction | None = None  # the direction that fired
        self._start_step = 0
        self._confirmed = 0  # records in a row over the threshold and far (``confirm_z`` None)
        self._out_run = 0  # records in a row ``confirm_z`` robust SDs out (``confirm_z`` set)
        self._back_run = 0  # active: records in a row within ``back_z`` of the level it left

    def value(self, obs: Observation) -> float | None:
        value: float | None = getattr(obs, self.field)
        return value

    def _sides(self, score: Score) -> list[tuple[Direction, float]]:
        out: list[tuple[Direction, float]] = []
        if self.direction in (Direction.UP, Direction.BOTH):
            out.append((Direction.UP, score.up))
        if self.direction in (Direction.DOWN, Direction.BOTH):
            out.append((Direction.DOWN, score.down))
        return out

    def _far(self, side: Direction, score: Score) -> bool:
        """Whether the value is ``min_rise`` above (``min_fall`` below) the level (log streams)."""
        cfg = self.config
        if not self.stream.log or score.level <= 0.0:
            return True
        ratio = (score.value + cfg.floor) / score.level
        if side is Direction.UP:
            return ratio >= 1.0 + cfg.min_rise
        return ratio <= 1.0 - cfg.min_fall

    def _out(self, score: Score) -> bool:
        """Whether the value is ``confirm_z`` robust SDs out and far from the level on a
        watched side (a record that counts toward ``confirm`` when ``confirm_z`` is set)."""
        out = self.config.confirm_z or 0.0
        return any(
            (score.z >= out if side is Direction.UP else score.z <= -out) and self._far(side, score)
            for side, _ in self._sides(score)
        )

    def pattern(self, score: Score) -> tuple[Direction, str] | None:
        """A shape that fires the alert besides the CUSUM (its direction and words for it), or
        None: none here; :class:`~.spikes.GradNormSpike` watches for growing spikes,
        :class:`~.length.LengthDrift` for a collapse to near-empty completions."""
        del score
        return None

    def holds(self, score: Score) -> bool:
        """Active: whether the shape :meth:`pattern` fired on is still there (the alert then
        stays on with the watched CUSUM at 0); False here, :class:`~.reward.RewardCollapse`
        holds while the reward stays collapsed."""
        del score
        return False

    def update(self, obs: Observation) -> Transition | None:
        x = self.value(obs)
        if x is None or not math.isfinite(x):
            return None
        # while the alert is on, the fault's records are judged against the level it left
        # and never become it: the alert ends when the value is back there, not when the
        # window has filled with the fault (a reward at 0 for 64 records read "recovered")
        score = self.stream.update(x, learn=not self.active)
        if score is None:
            return None
        if self.config.confirm_z is not None:
            self._out_run = self._out_run + 1 if self._out(score) else 0
        pattern = self.pattern(score)
        if not self.active:
            # the quiet path (almost every record) builds nothing: no watched CUSUM over the
            # threshold and no pattern is no transition (the sides _sides lists, read inline)
            threshold = self.config.threshold
            direction = self.direction
            if (
                pattern is None
                and (direction is Direction.DOWN or score.up <= threshold)
                and (direction is Direction.UP or score.down <= threshold)
            ):
                self._confirmed = 0
                return None
            return self._fire(obs, x, score, pattern)
        up = self.side is Direction.UP
        cusum = score.up if up else score.down
        near = self.config.back_z
        self._back_run = self._back_run + 1 if (score.z <= near if up else score.z >= -near) else 0
        if (cusum > 0.0 and self._back_run < self.config.back_records) or self.holds(score):
            return None
        self._back_run = 0
        if up:  # the evidence ends with the alert: the next fault starts from 0
            self.stream.up = 0.0
        else:
            self.stream.down = 0.0
        return self._recover(obs, x, score)

    def level(self, score: Score) -> float:
        """The level in the value's own units: a log stream scores ``value + floor``, so its
        level less the floor (at least 0)."""
        if self.stream.log:
            return max(score.level - self.config.floor, 0.0)
        return score.level

    def _values(self, x: float, score: Score) -> dict[str, float]:
        """The transition's values (the CUSUM of the side that fired, else the upward one)."""
        return {
            self.field: x,
            "level": self.level(score),
            "robust_z": score.z,
            "cusum": score.up if self.side is not Direction.DOWN else score.down,
            "threshold": self.config.threshold,
        }

    def _fire(
        self, obs: Observation, x: float, score: Score, pattern: tuple[Direction, str] | None
    ) -> Transition | None:
        """Not active: the transition that starts the alert, or None (a CUSUM over the
        threshold, yet not ``min_rise``/``min_fall`` from the level, or not yet on ``confirm``
        records in a row)."""
        cfg = self.config
        values = self._values(x, score)
        over = [(d, c) for d, c in self._sides(score) if c > cfg.threshold and self._far(d, score)]
        if cfg.confirm_z is None:  # records in a row with the CUSUM over, far from the level
            self._confirmed = confirmed = self._confirmed + 1 if over else 0
        else:  # records in a row ``confirm_z`` out (counted in update), the CUSUM over on this
            confirmed = self._out_run
        if confirmed < cfg.confirm:
            over = []
        if not over and pattern is None:
            return None
        self._confirmed = self._out_run = 0
        if over:
            side, cusum = max(over, key=lambda dc: dc[1])
        else:
            assert pattern is not None
            side = pattern[0]
            cusum = score.up if side is Direction.UP else score.down
        self.active, self.side, self._start_step = True, side, obs.step
        values["cusum"] = cusum
        level = values["level"]
        ratio = (
            f"is {times(x / level)} x its level {level:.4g}"
            if self.stream.log and level > 0.0
            else f"vs its level {level:.4g}"
        )
        if over:
            why = f"CUSUM {cusum:.1f} > {cfg.threshold:g} robust SDs of this run"
            detail = f"{self.what} {x:.4g} {ratio} (robust z {score.z:+.1f}; {why})"
        else:
            assert pattern is not None
            detail = f"{self.what} {x:.4g} {ratio} (robust z {score.z:+.1f}): {pattern[1]}"
        return Transition(
            self.name,
            cfg.severity,
            True,
            self.reasons.get(side, Reason.CUSUM_EXCEEDED),
            obs.step,
            obs.wall_time,
            self.summaries[side],
            f"{detail} at step {obs.step}",
            values,
        )

    def _recover(self, obs: Observation, x: float, score: Score) -> Transition:
        """Active and the watched CUSUM back at 0: the transition that ends the alert."""
        values = self._values(x, score)
        self.active = False
        ended, self.side = self.side, None
        return Transition(
            self.name,
            self.config.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            f"{self.what.capitalize()} back at its level",
            f"{self.what} {x:.4g} back near its level {values['level']:.4g} at step {obs.step}; "
            f"the {'rise' if ended is Direction.UP else 'fall'} began at step {self._start_step}",
            values,
        )
