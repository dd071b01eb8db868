"""The least-squares slope of a stream over its last records, in constant time per record."""

from __future__ import annotations

import math
from collections import deque


class SlidingSlope:
    """Slope of ``y`` on ``x`` over the last ``window`` points, and its standard error.

    Keeps the five sums of the window, so a point costs the same whatever the window. The
    sums are taken about an origin (the window's first point when they were last rebuilt,
    so large step numbers and a level far from 0 lose no digits) and rebuilt from the
    window's points every ``window`` points, so rounding does not pile up over a long run.

    >>> trend = SlidingSlope(4)
    >>> for x, y in enumerate([9.0, 1.0, 3.0, 5.0, 7.0]):
    ...     trend.add(x, y)
    >>> trend.slope()
    (2.0, 0.0)
    """

    def __init__(self, window: int) -> None:
        if window < 3:
            raise ValueError(f"window must be at least 3 points, got {window}")
        self._points: deque[tuple[float, float]] = deque(maxlen=window)
        self._origin = (0.0, 0.0)
        self._added = 0  # points since the sums were last rebuilt
        self._sx = self._sy = self._sxx = self._sxy = self._syy = 0.0

    def add(self, x: float, y: float) -> None:
        """Take the point ``(x, y)``, dropping the oldest once the window is full."""
        points = self._points
        if len(points) == points.maxlen:
            self._take(*points[0], -1.0)
        points.append((x, y))
        self._take(x, y, 1.0)
        self._added += 1
        if self._added >= (points.maxlen or 1):
            self._rebuild()

    def slope(self) -> tuple[float, float] | None:
        """``(slope, standard error)`` once the window is full and its ``x`` vary, else None."""
        n = len(self._points)
        if n < (self._points.maxlen or 0):
            return None
        sxx = self._sxx - self._sx * self._sx / n
        if sxx <= 0.0:
            return None
        sxy = self._sxy - self._sx * self._sy / n
        slope = sxy / sxx
        # the residual sum of squares, at least 0 (a perfect line can round to just below)
        resid = max(self._syy - self._sy * self._sy / n - slope * sxy, 0.0)
        return slope, math.sqrt(resid / (n - 2) / sxx)

    def _take(self, x: float, y: float, sign: float) -> None:
        u, v = x - self._origin[0], y - self._origin[1]
        self._sx += sign * u
        self._sy += sign * v
        self._sxx += sign * u * u
        self._sxy += sign * u * v
        self._syy += sign * v * v

    def _rebuild(self) -> None:
        self._origin = self._points[0]
        self._added = 0
        self._sx = self._sy = self._sxx = self._sxy = self._syy = 0.0
        for x, y in self._points:
            self._take(x, y, 1.0)
