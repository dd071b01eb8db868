"""SlidingSlope (EntropyExhaustion's entropy trend) against the two-pass least squares."""

from __future__ import annotations

import math
import random

import pytest

from inversion_monitor.server.detectors.trend import SlidingSlope


def two_pass(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The slope and its standard error from the window's means (the former code)."""
    n = len(points)
    ms = sum(s for s, _ in points) / n
    mh = sum(h for _, h in points) / n
    sxx = sum((s - ms) ** 2 for s, _ in points)
    if sxx <= 0.0:
        return None
    slope = sum((s - ms) * (h - mh) for s, h in points) / sxx
    resid = sum((h - mh - slope * (s - ms)) ** 2 for s, h in points)
    return slope, math.sqrt(resid / (n - 2) / sxx)


@pytest.mark.parametrize("window", [3, 40, 80])
def test_equals_the_two_pass_fit_on_every_record_of_a_long_run(window: int) -> None:
    """Steps from 10^6 with gaps, an entropy far from 0 with a slow fall, noise and heavy
    outliers: every record's slope and standard error as the window's own fit."""
    rng = random.Random(window)
    trend, points, step = SlidingSlope(window), [], 1_000_000
    for i in range(20 * window + 7):
        step += rng.choice((1, 1, 1, 2, 5))
        h = 1.2 - 1e-5 * i + rng.gauss(0.0, 0.02) + (rng.random() < 0.01) * rng.gauss(0.0, 1.0)
        trend.add(step, h)
        points = [*points[-(window - 1) :], (step, h)]
        got, want = trend.slope(), two_pass(points) if len(points) == window else None
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert got[0] == pytest.approx(want[0], rel=1e-9, abs=1e-15), i
        assert got[1] == pytest.approx(want[1], rel=1e-7, abs=1e-15), i


def test_a_line_has_no_error_and_a_short_or_flat_window_no_slope() -> None:
    trend = SlidingSlope(5)
    for x in range(4):
        trend.add(float(x), 0.5 - 0.25 * x)
    assert trend.slope() is None  # not full yet
    trend.add(4.0, 0.5 - 1.0)
    assert trend.slope() == (-0.25, 0.0)
    flat = SlidingSlope(3)
    for y in (1.0, 2.0, 3.0):
        flat.add(7.0, y)  # one step for every point: no slope
    assert flat.slope() is None
    with pytest.raises(ValueError, match="window must be at least 3"):
        SlidingSlope(2)
