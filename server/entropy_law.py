"""The entropy-performance law R = -a e^H + b, fitted online per RL run (Cui et al. 2025).

With x = e^H the law is a line, R = ceiling + s (x - 1), where s = -a and
``ceiling`` = -a + b is the reward the run reaches when its entropy is
exhausted (H = 0). :func:`fit_entropy_law` fits it robustly (Huber IRLS,
scale from the MAD of the residuals) with standard errors from the weighted
least-squares covariance, so a noisy reward gives a wide interval rather than
a confident wrong number. The fit is reported only once entropy has moved
(``min_points`` records and an entropy spread of ``min_entropy_range`` nats).

:class:`EntropyLawTracker` keeps a bounded set of points per run: records are
averaged (in x = e^H - 1 and R, so the line is unchanged) into buckets of
equal size; when there are more than ``max_points`` buckets, neighbours merge
and the bucket size doubles, so the whole history keeps counting evenly. It
refits on every record early on, then every ~2% of the records seen. ``progress``
is the fraction of the law's reward gain already used:
(R(H_now) - R(H_0)) / (ceiling - R(H_0)) = (e^H0 - e^Hnow) / (e^H0 - 1), with
H_0 the run's early entropy and H_now its smoothed current entropy.

:class:`EntropyLawMonitor` is the ingest listener that tracks every RL run (a
restarted server replays the stored records of the runs still on /metrics) and
:class:`EntropyLawCollector` exposes ``inversion_monitor_entropy_law_ceiling``,
``..._ceiling_stderr`` and ``..._progress`` (label ``run``).

>>> import math
>>> tracker = EntropyLawTracker()
>>> for step in range(60):
...     h = 1.5 * math.exp(-step / 30)
...     _ = tracker.update(step, h, -0.4 * math.exp(h) + 1.2)
>>> fit = tracker.fit
>>> round(fit.ceiling, 3), round(fit.a, 3), fit.valid
(0.8, 0.4, True)
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inversion_monitor.proto.v1 import monitor_pb2

HUBER_K = 1.345
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class LawFit:
    """A fit of R = ceiling + s (e^H - 1); ``a`` = -s, ``b`` = ceiling + a.

    ``valid`` is False while the data cannot support the law (too few points,
    entropy has not moved, reward does not rise as entropy falls); the numbers
    are then still the best fit but should not be shown.
    """

    ceiling: float
    ceiling_se: float
    a: float
    a_se: float
    n: int
    scale: float
    valid: bool

    @property
    def b(self) -> float:
        return self.ceiling + self.a

    def reward_at(self, entropy: float) -> float:
        """R predicted at ``entropy`` nats."""
        return self.ceiling - self.a * (math.exp(entropy) - 1.0)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _weighted_line(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]
) -> tuple[float, float, float, float, float] | None:
    """Weighted least squares y = c + s x: (c, s, var_c/sigma^2, var_s/sigma^2, cov/sigma^2)."""
    sw = sum(ws)
    if sw <= 0:
        return None
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    if sxx <= 1e-12 * max(1.0, mx * mx) * sw:
        return None
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    s = sxy / sxx
    c = my - s * mx
    var_s = 1.0 / sxx
    var_c = 1.0 / sw + mx * mx / sxx
    cov = -mx / sxx
    return c, s, var_c, var_s, cov


def fit_entropy_law(
    entropies: Sequence[float],
    rewards: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    min_points: int = 10,
    min_entropy_range: float = 0.05,
    iterations: int = 20,
) -> LawFit | None:
    """Robust fit of R = -a e^H + b; None when the points cannot define a line.

    ``weights`` count how many raw records each point stands for (a point
    that is the mean of w records has variance sigma^2 / w).

    >>> hs = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.9, 0.7, 0.5, 0.3, 0.15, 0.05]
    >>> rs = [-0.5 * math.exp(h) + 1.0 for h in hs]
    >>> rs[0] = 5.0  # one wild reward: Huber weights shrug it off
    >>> fit = fit_entropy_law(hs, rs)
    >>> round(fit.ceiling, 2), round(fit.a, 2)
    (0.5, 0.5)
    """
    n = len(entropies)
    if n != len(rewards):
        raise ValueError(f"entropies has {n} values but rewards has {len(rewards)}")
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"weights has {len(ws)} values; expected {n}")
    if n < 2:
        return None
    # x = e^H - 1: the intercept of R on x is the ceiling
    return _fit_x(
        [math.expm1(h) for h in entropies],
        list(rewards),
        ws,
        entropy_range=max(entropies) - min(entropies),
        min_points=min_points,
        min_entropy_range=min_entropy_range,
        iterations=iterations,
    )


def _fit_x(
    xs: Sequence[float],
    ys: Sequence[float],
    ws: Sequence[float],
    *,
    entropy_range: float,
    min_points: int,
    min_entropy_range: float,
    iterations: int,
) -> LawFit | None:
    """The fit of R = ceiling + s x (x = e^H - 1) on weighted points."""
    n = len(xs)
    base = _weighted_line(xs, ys, ws)
    if base is None:
        return None
    c, s, var_c, var_s, _ = base
    robust = list(ws)
    scale = 0.0
    for _ in range(iterations):
        resid = [math.sqrt(w) * (y - c - s * x) for w, x, y in zip(ws, xs, ys, strict=True)]
        scale = _MAD_TO_SD * _median([abs(r) for r in resid])
        if scale <= 0.0:
            scale = math.sqrt(sum(r * r for r in resid) / max(1, n - 2))
            if scale <= 0.0:
                robust = list(ws)
                break
        robust = [
            w * min(1.0, HUBER_K / (abs(r) / scale)) if r else w
            for w, r in zip(ws, resid, strict=True)
        ]
        refit = _weighted_line(xs, ys, robust)
        if refit is None:
            break
        done = abs(refit[0] - c) + abs(refit[1] - s) <= 1e-7 * (1.0 + abs(c) + abs(s))
        c, s, var_c, var_s, _ = refit
        if done:
            break
    final = _weighted_line(xs, ys, robust)
    if final is not None:
        c, s, var_c, var_s, _ = final
    # residual scale per unit weight (robust); 0 for exact data
    sigma = scale
    ceiling_se = sigma * math.sqrt(max(var_c, 0.0))
    a_se = sigma * math.sqrt(max(var_s, 0.0))
    count = round(sum(ws))
    a = -s
    valid = (
        count >= min_points
        and entropy_range >= min_entropy_range
        and a > 0.0
        and (a_se == 0.0 or a > 2.0 * a_se)
    )
    return LawFit(
        ceiling=c, ceiling_se=ceiling_se, a=a, a_se=a_se, n=count, scale=sigma, valid=valid
    )


@dataclass(frozen=True)
class LawState:
    """What the tracker knows after a record: the fit and where the run stands on it."""

    fit: LawFit | None
    entropy_now: float
    entropy_start: float
    progress: float | None


class EntropyLawTracker:
    """Online fit of the law for one run; :meth:`update` with each record's (H, R).

    Args:
        max_points: points kept (neighbours merged beyond it: bounded memory and time).
        warmup: records whose mean entropy is the run's early level H_0.
        smoothing: EWMA weight of a new entropy in H_now.
        min_points, min_entropy_range: as :func:`fit_entropy_law`.
    """

    def __init__(
        self,
        *,
        max_points: int = 128,
        warmup: int = 5,
        smoothing: float = 0.2,
        min_points: int = 10,
        min_entropy_range: float = 0.05,
    ) -> None:
        if max_points < 4:
            raise ValueError(f"max_points={max_points} must be >= 4")
        self.max_points = max_points
        self.warmup = warmup
        self.smoothing = smoothing
        self.min_points = min_points
        self.min_entropy_range = min_entropy_range
        # full buckets (mean x = e^H - 1, mean reward, records), all of _bucket records
        self._points: list[tuple[float, float, float]] = []
        self._bucket = 1
        # the bucket being filled: (sum x, sum reward, records)
        self._open = (0.0, 0.0, 0)
        self._early: list[float] = []
        self.entropy_start: float | None = None
        self.entropy_now: float | None = None
        self._h_min = math.inf
        self._h_max = -math.inf
        self.fit: LawFit | None = None
        self.records = 0
        self._since_fit = 0

    def update(self, step: int, entropy: float, reward: float) -> LawState | None:
        """Add one record's policy entropy (nats) and mean reward; None if not finite."""
        if not (math.isfinite(entropy) and math.isfinite(reward)):
            return None
        self.records += 1
        if self.entropy_start is None:
            self._early.append(entropy)
            if len(self._early) >= self.warmup:
                self.entropy_start = sum(self._early) / len(self._early)
        self.entropy_now = (
            entropy
            if self.entropy_now is None
            else self.entropy_now + self.smoothing * (entropy - self.entropy_now)
        )
        self._h_min = min(self._h_min, entropy)
        self._h_max = max(self._h_max, entropy)
        sx, sr, count = self._open
        sx, sr, count = sx + math.expm1(entropy), sr + reward, count + 1
        if count < self._bucket:
            self._open = (sx, sr, count)
        else:
            self._points.append((sx / count, sr / count, float(count)))
            self._open = (0.0, 0.0, 0)
            if len(self._points) > self.max_points:
                self._merge()
        # refit on every record early, then every ~2% of the records seen (a fit of many
        # records moves slowly): bounded work per record on the server's writer thread
        self._since_fit += 1
        if self._h_max - self._h_min < self.min_entropy_range or self.records < self.min_points:
            return self.state  # the law cannot be trusted yet: spare the fit
        if self.fit is not None and self._since_fit < max(1, self.records // 50):
            return self.state
        self._since_fit = 0
        points = list(self._points)
        if self._open[2]:
            sx, sr, count = self._open
            points.append((sx / count, sr / count, float(count)))
        xs, rs, ws = zip(*points, strict=True)
        self.fit = (
            _fit_x(
                xs,
                rs,
                ws,
                entropy_range=self._h_max - self._h_min,
                min_points=self.min_points,
                min_entropy_range=self.min_entropy_range,
                iterations=20,
            )
            if len(points) >= 2
            else None
        )
        return self.state

    def _merge(self) -> None:
        """Merge neighbouring buckets pairwise; the bucket size doubles."""
        points = self._points
        merged = []
        for i in range(0, len(points) - 1, 2):
            (x1, r1, w1), (x2, r2, w2) = points[i], points[i + 1]
            w = w1 + w2
            merged.append(((x1 * w1 + x2 * w2) / w, (r1 * w1 + r2 * w2) / w, w))
        if len(points) % 2:
            merged.append(points[-1])
        self._points = merged
        self._bucket *= 2

    @property
    def state(self) -> LawState | None:
        if self.entropy_now is None:
            return None
        start = self.entropy_start if self.entropy_start is not None else self._early[0]
        return LawState(self.fit, self.entropy_now, start, self.progress)

    @property
    def progress(self) -> float | None:
        """Fraction of the law's reward gain used so far (None without a valid fit)."""
        fit = self.fit
        if fit is None or not fit.valid or self.entropy_start is None:
            return None
        assert self.entropy_now is not None
        x0 = math.expm1(self.entropy_start)
        if x0 <= 0.0:
            return None
        return (x0 - math.expm1(self.entropy_now)) / x0


def law_inputs(record: monitor_pb2.StepRecord) -> tuple[float, float] | None:
    """(policy entropy, reward mean) of a record, or None when it lacks either.

    >>> rec = monitor_pb2.StepRecord(reward_mean=0.5, policy_entropy_mean=1.2)
    >>> law_inputs(rec)
    (1.2, 0.5)
    """
    if not (record.HasField("reward_mean") and record.HasField("policy_entropy_mean")):
        return None
    return record.policy_entropy_mean, record.reward_mean


class LawValues(Protocol):
    """What the law reads of a record's values (:class:`~.detectors.Observation`)."""

    @property
    def step(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def reward_mean(self) -> float | None: ...
    @property
    def policy_entropy_mean(self) -> float | None: ...


class _ViewLike(Protocol):
    @property
    def last_activity(self) -> float: ...


class EntropyLawMonitor:
    """Ingest listener: one :class:`EntropyLawTracker` per run that sends rewards.

    Fed on the writer thread (records of the run's lowest rank); read from any
    thread through :meth:`snapshot`.

    >>> mon = EntropyLawMonitor()
    >>> mon.on_record("r1", "demo", monitor_pb2.StepRecord(step=1, reward_mean=0.1,
    ...                                                     policy_entropy_mean=1.0))
    >>> mon.snapshot()["r1"][0]
    'demo'
    """

    def __init__(self, max_runs: int = 10_000, **tracker_args: Any) -> None:
        self.max_runs = max_runs
        self._tracker_args = tracker_args
        self._lock = threading.Lock()
        # run_id -> (display name, lowest rank seen, tracker), least recently fed first;
        # past max_runs the least recently fed run (aged out by then) makes room
        self._runs: OrderedDict[str, tuple[str, int, EntropyLawTracker]] = OrderedDict()
        self._states: dict[str, tuple[str, LawState]] = {}

    def on_record(self, run_id: str, display_name: str, record: monitor_pb2.StepRecord) -> None:
        inputs = law_inputs(record)
        if inputs is None:
            return
        self._feed(run_id, display_name, record.rank, record.step, inputs)

    def on_values(self, run_id: str, display_name: str, values: LawValues) -> None:
        """:meth:`on_record` from the record's values as the server read them once."""
        entropy, reward = values.policy_entropy_mean, values.reward_mean
        if entropy is None or reward is None:
            return
        self._feed(run_id, display_name, values.rank, values.step, (entropy, reward))

    def _feed(
        self, run_id: str, display_name: str, rank: int, step: int, inputs: tuple[float, float]
    ) -> None:
        entry = self._runs.get(run_id)
        if entry is None:
            while len(self._runs) >= self.max_runs:
                oldest, _ = self._runs.popitem(last=False)
                with self._lock:
                    self._states.pop(oldest, None)
            entry = (display_name, rank, EntropyLawTracker(**self._tracker_args))
            self._runs[run_id] = entry
        else:
            self._runs.move_to_end(run_id)
        if rank > entry[1]:
            return
        if rank < entry[1]:  # a lower rank appeared: it drives the run from now on
            entry = (display_name, rank, EntropyLawTracker(**self._tracker_args))
            self._runs[run_id] = entry
        state = entry[2].update(step, *inputs)
        if state is not None:
            with self._lock:
                self._states[run_id] = (display_name, state)

    def restore(self, run_id: str, display_name: str, payloads: Iterable[bytes]) -> int:
        """Replay a run's stored records (oldest first) after a restart; returns how many fed."""
        fed = 0
        for payload in payloads:
            record = monitor_pb2.StepRecord.FromString(payload)
            if law_inputs(record) is not None:
                self.on_record(run_id, display_name, record)
                fed += 1
        return fed

    def snapshot(self) -> dict[str, tuple[str, LawState]]:
        with self._lock:
            return dict(self._states)


class EntropyLawCollector(Collector):
    """``inversion_monitor_entropy_law_{ceiling,ceiling_stderr,progress}{run}``.

    Only runs with a valid fit, and active within the retention window (when
    ``views`` is given), have samples.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> reg = CollectorRegistry()
    >>> reg.register(EntropyLawCollector(EntropyLawMonitor()))
    >>> b"inversion_monitor_entropy_law_ceiling" in generate_latest(reg)
    True
    """

    def __init__(
        self,
        monitor: EntropyLawMonitor,
        views: Callable[[], Mapping[str, _ViewLike]] | None = None,
        retention_s: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._monitor = monitor
        self._views = views
        self._retention_s = retention_s
        self._clock = clock

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        run = ["run"]
        return [
            GaugeMetricFamily(
                "inversion_monitor_entropy_law_ceiling",
                "Reward ceiling -a + b of the entropy-performance law R = -a e^H + b fitted "
                "to the run's (policy entropy, reward) records: the reward at exhausted entropy.",
                labels=run,
            ),
            GaugeMetricFamily(
                "inversion_monitor_entropy_law_ceiling_stderr",
                "Standard error of the fitted reward ceiling.",
                labels=run,
            ),
            GaugeMetricFamily(
                "inversion_monitor_entropy_law_progress",
                "Fraction of the law's reward gain already used: (e^H0 - e^H) / (e^H0 - 1).",
                labels=run,
            ),
        ]

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterable[Any]:
        ceiling, stderr, progress = families = self._families()
        views = self._views() if self._views is not None else None
        cutoff = self._clock() - self._retention_s
        for run_id, (display, state) in sorted(self._monitor.snapshot().items()):
            if views is not None:
                view = views.get(run_id)
                if view is None or view.last_activity < cutoff:
                    continue
            fit = state.fit
            if fit is None or not fit.valid:
                continue
            ceiling.add_metric([display], fit.ceiling)
            stderr.add_metric([display], fit.ceiling_se)
            if state.progress is not None:
                progress.add_metric([display], state.progress)
        return families
