"""Correlation coefficients with their confidence intervals: average ranks,
Pearson, Spearman and the Fisher-z interval.

Functions follow the torchmetrics split: ``_x_update`` validates (errors say
expected vs got), ``_x_compute`` does the math, the public ``x()`` calls both.
Everything is computed in float64 and returned as 0-dim float64 tensors;
degenerate input gives NaN with a :class:`DegenerateInputWarning`, never a
plausible number such as 0. Ties get average ranks
(``scipy.stats.rankdata(method="average")``).

>>> import torch
>>> spearman(torch.tensor([0.1, 2.0, 1.2, 0.4]), torch.tensor([9.0, 1.0, 3.5, 7.0]))
tensor(-1., dtype=torch.float64)
"""

from __future__ import annotations

import math
import numbers
import statistics
from typing import Literal

import torch
from torch import Tensor

from inversion_monitor._checks import (
    as_float64,
    check_choice,
    check_confidence,
    check_floating,
    check_int,
    check_ndim,
    check_same_device,
    check_same_shape,
    check_tensor,
    warn_degenerate,
)

__all__ = ["fisher_ci", "pearson", "rank_average", "spearman"]

Method = Literal["spearman", "pearson"]
METHODS: tuple[str, ...] = ("spearman", "pearson")
# Fisher-z variance factor: Var(atanh r) ~ factor / (n - 3) (Fieller, Hartley & Pearson 1957)
_FISHER_VARIANCE = {"spearman": 1.06, "pearson": 1.0}
# |r| is clamped below 1 so that atanh stays finite (see fisher_ci)
_R_CLAMP = 1.0 - 1e-7


# --------------------------------------------------------------------------- ranks


def _rank_average_update(x: object) -> Tensor:
    t = check_tensor(x, "x")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"x: expected a real (integer or floating) tensor, got {t.dtype}")
    check_ndim(t, "x", 1, "(n,)")
    return t


def _rank_average_compute(x: Tensor) -> Tensor:
    """Average ranks (1-based, float64) of a validated 1-D tensor, without a loop over ties."""
    device = torch.device("cpu") if x.device.type == "mps" else x.device
    values = x.detach().to(device)
    if values.is_floating_point():
        values = values.to(torch.float64)  # exact for every float16/bfloat16/float32 value
        if bool(torch.isnan(values).any()):
            return torch.full(values.shape, math.nan, dtype=torch.float64, device=device)
    n = values.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.float64, device=device)
    sorted_values, order = torch.sort(values, stable=True)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0)  # 1-based rank of each tie group's last member
    group_rank = (ends - counts).to(torch.float64) + (counts.to(torch.float64) + 1.0) / 2.0
    ranks = torch.empty(n, dtype=torch.float64, device=device)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def rank_average(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank.

    Same as ``scipy.stats.rankdata(x, method="average")``: integer or floating
    input, float64 output on the input's device; any NaN makes every rank NaN
    (scipy's ``nan_policy="propagate"``); ``-0.0`` ties with ``0.0``.

    >>> rank_average(torch.tensor([10.0, 30.0, 20.0, 20.0]))
    tensor([1.0000, 4.0000, 2.5000, 2.5000], dtype=torch.float64)
    >>> rank_average(torch.tensor([7, 7, 7]))
    tensor([2., 2., 2.], dtype=torch.float64)
    """
    return _rank_average_compute(_rank_average_update(x))


# --------------------------------------------------------------------------- correlations


def _pair_update(x: object, y: object, name_x: str = "x", name_y: str = "y") -> None:
    tx = check_floating(x, name_x)
    ty = check_floating(y, name_y)
    check_ndim(tx, name_x, 1, "(n,)")
    check_ndim(ty, name_y, 1, "(n,)")
    check_same_shape(tx, ty, name_x, name_y)
    check_same_device(tx, ty, name_x, name_y)


def _degenerate_reason(
    x: Tensor, y: Tensor, name_x: str = "x", name_y: str = "y", *, min_n: int = 2
) -> str | None:
    """Why a correlation of ``x`` and ``y`` (float64, same shape) is undefined, or None."""
    n = x.numel()
    if n < min_n:
        return f"n={n} value pair(s), fewer than {min_n}"
    for name, t in ((name_x, x), (name_y, y)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return f"{name} has {bad} non-finite value(s)"
    for name, t in ((name_x, x), (name_y, y)):
        if bool(t.max() == t.min()):
            return f"{name} is constant over the {n} values"
    return None


def _pearson_value(x: Tensor, y: Tensor) -> Tensor:
    """Pearson r of finite, non-constant float64 vectors, safe from overflow and underflow."""
    parts = []
    for t in (x, y):
        scaled = t / t.abs().max()  # in [-1, 1]: the mean cannot overflow
        centered = scaled - scaled.mean()
        parts.append(centered / centered.abs().max())  # the squares cannot underflow
    xc, yc = parts
    r = (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return r.clamp(-1.0, 1.0)


def _pearson_compute(x: Tensor, y: Tensor) -> tuple[Tensor, str | None]:
    x64, y64 = as_float64(x), as_float64(y)
    reason = _degenerate_reason(x64, y64)
    if reason is not None:
        return torch.tensor(math.nan, dtype=torch.float64, device=x64.device), reason
    return _pearson_value(x64, y64), None


def _spearman_compute(x: Tensor, y: Tensor) -> tuple[Tensor, str | None]:
    x64, y64 = as_float64(x), as_float64(y)
    reason = _degenerate_reason(x64, y64)
    if reason is not None:
        return torch.tensor(math.nan, dtype=torch.float64, device=x64.device), reason
    return _pearson_value(_rank_average_compute(x64), _rank_average_compute(y64)), None


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson's linear correlation coefficient r of two 1-D floating tensors.

    .. math:: r = \\frac{\\sum_i (x_i - \\bar x)(y_i - \\bar y)}
                       {\\sqrt{\\sum_i (x_i - \\bar x)^2 \\sum_i (y_i - \\bar y)^2}}

    Args:
        x: shape ``(n,)``, any floating dtype.
        y: shape ``(n,)``, same device.

    Returns:
        0-dim float64 tensor in [-1, 1]; NaN with a :class:`DegenerateInputWarning`
        when n < 2, a value is non-finite or either input is constant.

    >>> pearson(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 6.0, 8.5]))
    tensor(0.9984, dtype=torch.float64)
    """
    _pair_update(x, y)
    value, reason = _pearson_compute(x, y)
    if reason is not None:
        warn_degenerate("pearson", reason)
    return value


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation rho of two 1-D floating tensors (ties: average ranks).

    rho is Pearson's r of the average ranks, which equals
    ``scipy.stats.spearmanr`` with ties too.

    Args:
        x: shape ``(n,)``, any floating dtype.
        y: shape ``(n,)``, same device.

    Returns:
        0-dim float64 tensor in [-1, 1]; NaN with a :class:`DegenerateInputWarning`
        when n < 2, a value is non-finite or either input is constant.

    >>> spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 8.0, 27.0, 64.0]))
    tensor(1., dtype=torch.float64)
    >>> spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([4.0, 3.0, 1.0, 2.0]))
    tensor(-0.6325, dtype=torch.float64)
    """
    _pair_update(x, y)
    value, reason = _spearman_compute(x, y)
    if reason is not None:
        warn_degenerate("spearman", reason)
    return value


# --------------------------------------------------------------------------- confidence interval


def _fisher_ci_update(
    r: object, n: object, method: object, confidence: object
) -> tuple[float, int]:
    if isinstance(r, Tensor):
        if r.numel() != 1:
            raise ValueError(f"r: expected a scalar, got a tensor of shape {tuple(r.shape)}")
        r_value = float(r)
    elif isinstance(r, numbers.Real) and not isinstance(r, bool):
        r_value = float(r)
    else:
        raise TypeError(f"r: expected a float in [-1, 1], got {type(r).__name__} {r!r}")
    if not math.isnan(r_value) and not -1.0 <= r_value <= 1.0:
        raise ValueError(f"r: expected a correlation in [-1, 1] (or NaN), got {r_value!r}")
    check_choice(method, "method", METHODS)
    check_confidence(confidence)
    return r_value, check_int(n, "n", minimum=0)


def _fisher_ci_compute(r: float, n: int, method: str, confidence: float) -> tuple[float, float]:
    if n <= 3 or math.isnan(r):
        return (math.nan, math.nan)
    z = math.atanh(max(-_R_CLAMP, min(_R_CLAMP, r)))
    half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0) * math.sqrt(
        _FISHER_VARIANCE[method] / (n - 3)
    )
    # min/max keep r inside the interval when it was clamped (|r| = 1)
    return (min(math.tanh(z - half), r), max(math.tanh(z + half), r))


def fisher_ci(
    r: float | Tensor, n: int, *, method: Method, confidence: float = 0.95
) -> tuple[float, float]:
    """Confidence interval of a correlation from the Fisher transform z = atanh(r).

    z is taken as normal with standard error ``sqrt(1.06 / (n - 3))`` for
    Spearman and ``1 / sqrt(n - 3)`` for Pearson; the bounds are
    ``tanh(z -/+ q * se)`` with q the normal quantile of ``confidence``.

    Edge cases: ``(nan, nan)`` when n <= 3 or r is NaN. At |r| = 1 the
    transform is infinite: r is clamped to ``±(1 - 1e-7)``, so the interval
    stays finite, contains r and is nearly a point (the approximation is
    poor there; report n with it).

    >>> tuple(round(v, 4) for v in fisher_ci(-0.5, 100, method="pearson"))
    (-0.6341, -0.3366)
    >>> tuple(round(v, 4) for v in fisher_ci(-0.5, 100, method="spearman"))
    (-0.6376, -0.3314)
    >>> fisher_ci(0.3, 3, method="spearman")
    (nan, nan)
    """
    r_value, n_value = _fisher_ci_update(r, n, method, confidence)
    return _fisher_ci_compute(r_value, n_value, method, confidence)
