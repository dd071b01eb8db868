"""The detectors' per-record fast paths against brute-force references.

Every record of every run goes through :func:`~inversion_monitor.server.record_values.read_values`
and the :class:`~inversion_monitor.server.detectors.robust.RobustStream` of each drift
detector, so those are written for speed (level and MAD found by bisection, nothing
re-sorted, the optional fields read in one pass). Here each is checked, value for value,
against the plain version: sorting the window, reading every field by name, calling every detector.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from enum import Enum

import pytest
from pydantic import BaseModel

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.proto.vocabulary import HEALTH_FIELDS
from inversion_monitor.server.detectors.base import Observation
from inversion_monitor.server.detectors.config import AlertsConfig
from inversion_monitor.server.detectors.robust import (
    DriftConfig,
    RobustStream,
    Scale,
    _mad,
    _mad_split,
    _median,
)
from inversion_monitor.server.detectors.run import RunDetectors
from inversion_monitor.server.record_values import read_values

# the health doubles in Observation's order
OPTIONAL_DOUBLES = tuple(field for field in Observation._fields if field in HEALTH_FIELDS)


class ReferenceStream:
    """RobustStream written plainly: the window's median and MAD by sorting, every record."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.window: deque[float] = deque(maxlen=config.window)
        self.warm: list[float] = []
        self.log = None if config.scale is Scale.AUTO else config.scale is Scale.LOG
        self.up = self.down = 0.0

    def _y(self, x: float) -> float:
        return math.log(max(x, 0.0) + self.config.floor + 1e-12) if self.log else x

    def update(self, x: float) -> tuple[float, float, float, float, float] | None:
        cfg = self.config
        if self.log is None:
            self.warm.append(x)
            if len(self.warm) < cfg.warmup:
                return None
            self.log = min(self.warm) > 0.0
            self.window.extend(self._y(v) for v in self.warm)
            return None
        y = self._y(x)
        if len(self.window) < cfg.warmup:
            self.window.append(y)
            return None
        level = statistics.median(self.window)
        mad = statistics.median(abs(v - level) for v in self.window)
        scale = max(1.4826 * mad, cfg.min_scale)
        z = (y - level) / scale
        zc = z if cfg.z_cap is None else max(-cfg.z_cap, min(cfg.z_cap, z))
        cap = 2.0 * cfg.threshold
        self.up = min(cap, max(0.0, self.up + zc - cfg.k))
        self.down = min(cap, max(0.0, self.down - zc - cfg.k))
        self.window.append(level + max(-cfg.clip, min(cfg.clip, z)) * scale)
        return (x, math.exp(level) if self.log else level, z, self.up, self.down)


def test_mad_equals_sorting_exactly() -> None:
    """One bisection gives both middle deviations: the same float as sorting them."""
    rng = random.Random(3)
    for _ in range(3000):
        n = rng.randint(1, 90)
        ys = sorted(rng.choice([rng.gauss(0, 1), float(rng.randint(-3, 3))]) for _ in range(n))
        med = _median(ys)
        assert _mad(ys, med) == statistics.median(abs(y - med) for y in ys)


def test_mad_from_any_hint_equals_the_bisection() -> None:
    """A stream starts the MAD's search from the last split: every hint (out of range ones
    too) gives the same split and the same float as bisecting, and as sorting."""
    rng = random.Random(4)
    for _ in range(600):
        n = rng.randint(1, 70)
        ys = sorted(rng.choice([rng.gauss(0, 1), float(rng.randint(-3, 3))]) for _ in range(n))
        med = _median(ys)
        want = statistics.median(abs(y - med) for y in ys)
        bisected = _mad_split(ys, med, -1)
        assert bisected[0] == want
        for hint in range(0, n + 3):
            assert _mad_split(ys, med, hint) == bisected, (ys, hint)


@pytest.mark.parametrize("scale", list(Scale))
@pytest.mark.parametrize("z_cap", [None, 4.0])
def test_robust_stream_matches_the_sorting_reference(scale: Scale, z_cap: float | None) -> None:
    rng = random.Random(f"{scale.value}-{z_cap}")
    for trial in range(20):
        config = DriftConfig(
            scale=scale,
            warmup=rng.randint(3, 20),
            window=rng.randint(20, 70),
            z_cap=z_cap,
            floor=rng.choice([0.0, 0.1]),
        )
        fast, slow = RobustStream(config), ReferenceStream(config)
        level = rng.uniform(0.5, 5.0)
        for step in range(400):
            if step % 97 == 50:  # a shift, a spike, ties and non-positive values now and then
                level *= rng.choice([0.3, 3.0])
            x = rng.choice(
                [
                    level * math.exp(rng.gauss(0.0, 0.1)),
                    round(level, 1),
                    level * 20.0,
                    -level if scale is not Scale.LOG else 0.0,
                ]
                if step % 7 == 0
                else [level * math.exp(rng.gauss(0.0, 0.1))]
            )
            got, want = fast.update(x), slow.update(x)
            assert (tuple(got) if got is not None else None) == want, (trial, step)


def _same(a: object, b: object) -> bool:
    """Equal and of one type; floats by repr (NaN is NaN, -0.0 is not 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return repr(a) == repr(b)
    return a == b and type(a) is type(b)


def _reference_observation(record: monitor_pb2.StepRecord) -> Observation:
    def opt(name: str) -> float | None:
        return float(getattr(record, name)) if record.HasField(name) else None

    inv = record.inversion
    spearman = pearson = None
    if record.HasField("inversion") and inv.spearman.HasField("value"):
        spearman = inv.spearman.value
    if record.HasField("inversion") and inv.pearson.HasField("value"):
        pearson = inv.pearson.value
    return Observation(
        step=record.step,
        wall_time=record.wall_time,
        rho=None if inv.insufficient else spearman,
        n=int(inv.n),
        entropy_mean=record.entropy.mean if record.entropy.HasField("mean") else None,
        nonfinite_fields=tuple(record.nonfinite_fields),
        rank=record.rank,
        spearman=spearman,
        pearson=pearson,
        score_mean=record.score.mean if record.score.HasField("mean") else None,
        **{name: opt(name) for name in OPTIONAL_DOUBLES},
    )


def test_observation_matches_reading_each_field_by_name() -> None:
    rng = random.Random(5)
    values = [0.0, -0.0, -1.5, 2.5, math.nan, math.inf, -math.inf, 1e-300]
    for _ in range(2000):
        rec = monitor_pb2.StepRecord(
            step=rng.randint(0, 10**6), wall_time=rng.random() * 1e9, rank=rng.randint(0, 3)
        )
        for name in OPTIONAL_DOUBLES:
            if rng.random() < 0.5:
                setattr(rec, name, rng.choice(values))
        if rng.random() < 0.7:
            rec.inversion.n = rng.randint(0, 4096)
            rec.inversion.insufficient = rng.random() < 0.2
            if rng.random() < 0.8:
                rec.inversion.spearman.value = rng.choice([-0.4, 0.0, math.nan])
            if rng.random() < 0.5:
                rec.inversion.pearson.value = rng.choice([-0.3, 0.0, -0.0])
        if rng.random() < 0.5:
            rec.entropy.mean = rng.choice(values)
        if rng.random() < 0.5:
            rec.score.mean = rng.choice(values)
        if rng.random() < 0.2:
            rec.nonfinite_fields.append("loss")
        got, want = read_values(rec), _reference_observation(rec)
        assert got._fields == want._fields
        assert all(_same(a, b) for a, b in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("kind", ["sft", "rl", "custom", ""])
def test_run_detectors_skip_only_what_would_answer_none(kind: str) -> None:
    """RunDetectors.update skips a drift detector whose field has no finite value: the same
    transitions as calling every detector on every observation."""
    fast, slow = RunDetectors(AlertsConfig(), kind), RunDetectors(AlertsConfig(), kind)
    rng = random.Random(kind)
    fired = 0
    levels = {name: rng.uniform(0.5, 5.0) for name in OPTIONAL_DOUBLES}
    for step in range(1, 1500):
        if step % 200 == 100:  # faults and recoveries, so transitions happen both ways
            name = rng.choice(OPTIONAL_DOUBLES)
            levels[name] *= rng.choice([0.1, 10.0])
        fields: dict[str, float | None] = {}
        for name, level in levels.items():
            r = rng.random()
            fields[name] = (
                None
                if r < 0.15
                else math.nan
                if r < 0.17
                else min(level * math.exp(rng.gauss(0.0, 0.05)), 1.0)
                if name == "clip_ratio"
                else level * math.exp(rng.gauss(0.0, 0.05))
            )
        obs = Observation(
            step,
            float(step),
            rho=rng.gauss(-0.4, 0.05) if rng.random() < 0.9 else None,
            n=256,
            entropy_mean=rng.uniform(1.5, 2.5) / (1 + step / 700),
            **fields,  # type: ignore[arg-type]
        )
        got = fast.update(obs)
        want = [t for det in slow.detectors if (t := det.update(obs)) is not None]
        assert got == want, step
        fired += len(got)
        if step % 50 == 0:  # and every detector's state is the same, skipped or called
            assert _state(fast.detectors) == _state(slow.detectors), step
    assert fired > 0  # the stream did move the detectors


def _state(value: object) -> object:
    """A detector's state as plain data (its settings left out; NaN compares as its repr), to
    compare two detectors fed differently. LengthDrift's ``_reward_z``, GradNormSpike's
    ``_loss_z`` and KLSurge's ``_entropy_z`` are per update (set at its start, read only within
    it), so they are left out too."""
    if isinstance(value, (list, tuple, deque)):
        return [_state(v) for v in value]
    if isinstance(value, dict):
        return {k: _state(v) for k, v in value.items()}
    if isinstance(value, float):
        return repr(value)
    if hasattr(value, "__dict__") and not isinstance(value, (type, BaseModel, Enum)):
        skip = {
            "config",
            "bump_config",
            "kl_config",
            "joint",
            "_reward_z",
            "_loss_z",
            "_entropy_z",
            "_params",
        }
        return {k: _state(v) for k, v in vars(value).items() if k not in skip}
    return value


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_windowed_level_against_brute_force(seed: int) -> None:
    """EntropyCollapse's reference past ``horizon`` steps (the median of the smoothed
    entropy's means per bucket of horizon / 20 steps before the current one, kept as running
    sums and computed once a bucket) against the same median computed from every record's
    smoothed entropy, the buckets rebuilt from scratch."""
    from inversion_monitor.server.detectors import EntropyCollapse, EntropyConfig, Observation

    rng = random.Random(seed)
    cfg = EntropyConfig(horizon=200)
    det, width = EntropyCollapse(cfg), 200 // 20
    ewmas: dict[int, float] = {}
    h, step, checked = 1.0, 0, 0
    for _ in range(3000):
        step += rng.choice((1, 1, 2, 3))  # steps may skip
        h *= math.exp(rng.gauss(0.0, 0.01)) * (3.0 if rng.random() < 0.01 else 1.0)
        det.update(Observation(step, 0.0, entropy_mean=h))
        assert det.ewma is not None and det._first is not None
        ewmas[step] = det.ewma
        if det.early is None or step - det._first <= 200:
            continue
        first = det._first
        buckets: dict[int, list[float]] = {}
        for s, v in ewmas.items():
            start = s - (s - first) % width
            if start + width > step - 200:
                buckets.setdefault(start, []).append(v)
        current = max(buckets)  # the stretch under way is left out
        means = sorted(sum(vs) / len(vs) for start, vs in buckets.items() if start != current)
        mid = len(means) // 2
        median = means[mid] if len(means) % 2 else 0.5 * (means[mid - 1] + means[mid])
        assert det._reference(step) == pytest.approx(median, rel=1e-12)
        checked += 1
    assert checked > 2000
