"""Inversion statistics: rank and linear correlation of entropy vs gradient strength.

:func:`inversion_stats` gives both coefficients of one set of tokens with
their Fisher-z intervals and summaries (the coefficients themselves are in
:mod:`inversion_monitor.metrics.correlation`); :class:`InversionAccumulator`
streams batches and reuses them. Everything is computed in float64, whatever
the input dtype. Degenerate input (too few pairs, a constant or non-finite
value) does not warn here: the result has ``insufficient=True`` with a
``reason``, never a plausible number such as 0.

>>> import torch
>>> entropy = torch.tensor([0.1, 2.0, 1.2, 0.4, 3.1, 0.9])
>>> score = torch.tensor([9.0, 1.0, 3.5, 7.0, 0.5, 3.5])
>>> s = inversion_stats(entropy, score)
>>> round(s.rho, 4), s.n, s.insufficient, tuple(round(v, 4) for v in s.ci)
(-0.9856, 6, False, (-0.9986, -0.8614))
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from inversion_monitor._checks import (
    DegenerateInputWarning,
    as_float64,
    check_choice,
    check_confidence,
    check_int,
    check_integer,
    check_ndim,
    check_same_device,
    check_same_shape,
)
from inversion_monitor.metrics import MIN_CORRELATION_PAIRS
from inversion_monitor.metrics.correlation import (
    METHODS,
    Method,
    _degenerate_reason,
    _fisher_ci_compute,
    _pair_update,
    _pearson_value,
    _rank_average_compute,
)

__all__ = ["DegenerateInputWarning", "InversionAccumulator", "InversionStats", "inversion_stats"]


@dataclass(frozen=True)
class InversionStats:
    """Correlation between per-token entropy and gradient strength, with summaries.

    ``rho`` is the coefficient of ``method``; both coefficients are always
    computed. When the sample cannot support a correlation (fewer than 4
    tokens, constant or non-finite values) ``insufficient`` is True,
    ``reason`` says why, and the coefficients and intervals are NaN.
    ``extra`` holds counts: ``n_nonfinite_dropped`` (pairs dropped by
    :func:`inversion_stats`) and ``n_evicted`` (:class:`InversionAccumulator`).

    >>> s = InversionStats.insufficient_sample(n=2, reason="n < 4")
    >>> s.insufficient, s.n, math.isnan(s.rho)
    (True, 2, True)
    """

    method: Method
    n: int
    spearman: float
    pearson: float
    spearman_ci: tuple[float, float]
    pearson_ci: tuple[float, float]
    confidence: float
    insufficient: bool
    reason: str | None
    entropy_mean: float
    entropy_p10: float
    entropy_p50: float
    entropy_p90: float
    score_mean: float
    score_p50: float
    score_p90: float
    # set when per_token_type=True: Spearman over per-token-id averages
    spearman_per_token_type: float | None = None
    n_token_types: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rho(self) -> float:
        """The coefficient of the chosen ``method``."""
        return self.spearman if self.method == "spearman" else self.pearson

    @property
    def ci(self) -> tuple[float, float]:
        """The confidence interval of ``rho``."""
        return self.spearman_ci if self.method == "spearman" else self.pearson_ci

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples become lists), e.g. for JSON."""
        out = asdict(self)
        out["spearman_ci"] = list(self.spearman_ci)
        out["pearson_ci"] = list(self.pearson_ci)
        return out

    @classmethod
    def insufficient_sample(
        cls, *, n: int, reason: str, method: Method = "spearman", confidence: float = 0.95
    ) -> InversionStats:
        """A result that says the sample was too small or degenerate."""
        nan = math.nan
        return cls(
            method=method,
            n=n,
            spearman=nan,
            pearson=nan,
            spearman_ci=(nan, nan),
            pearson_ci=(nan, nan),
            confidence=confidence,
            insufficient=True,
            reason=reason,
            entropy_mean=nan,
            entropy_p10=nan,
            entropy_p50=nan,
            entropy_p90=nan,
            score_mean=nan,
            score_p50=nan,
            score_p90=nan,
        )


# --------------------------------------------------------------------------- inversion statistics


def _inversion_stats_update(
    entropy: object,
    score: object,
    tokens: object,
    *,
    method: object,
    per_token_type: object,
    confidence: object,
    min_tokens: object,
) -> None:
    _pair_update(entropy, score, "entropy", "score")
    _check_options(method, per_token_type, confidence, min_tokens)
    if per_token_type and tokens is None:
        raise ValueError(
            "tokens: expected the token ids (shape (n,)) because per_token_type=True, got None"
        )
    if not per_token_type and tokens is not None:
        raise ValueError(
            "tokens: only used with per_token_type=True, got tokens with per_token_type=False; "
            "pass per_token_type=True or drop tokens"
        )
    if tokens is not None:
        t = check_integer(tokens, "tokens")
        check_ndim(t, "tokens", 1, "(n,)")
        assert isinstance(entropy, Tensor)
        check_same_shape(entropy, t, "entropy", "tokens")
        check_same_device(entropy, t, "entropy", "tokens")


def _check_options(
    method: object, per_token_type: object, confidence: object, min_tokens: object
) -> None:
    check_choice(method, "method", METHODS)
    if not isinstance(per_token_type, bool):
        raise TypeError(
            f"per_token_type: expected a bool, got {type(per_token_type).__name__} "
            f"{per_token_type!r}"
        )
    check_confidence(confidence)
    check_int(min_tokens, "min_tokens", minimum=MIN_CORRELATION_PAIRS)


def _quantiles(values: Tensor, qs: tuple[float, ...]) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) of finite float64 values."""
    n = values.numel()
    if n == 0:
        return [math.nan] * len(qs)
    ordered = torch.sort(values).values
    out = []
    for q in qs:
        position = q * (n - 1)
        low = math.floor(position)
        high = min(low + 1, n - 1)
        a, b = float(ordered[low]), float(ordered[high])
        out.append(a + (b - a) * (position - low))
    return out


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _per_type_means(entropy: Tensor, score: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Means of entropy and score over all occurrences of each token id (sorted by id)."""
    ids, inverse = torch.unique(tokens, return_inverse=True)
    counts = torch.bincount(inverse, minlength=ids.numel()).to(torch.float64)
    sums_e = torch.zeros(ids.numel(), dtype=torch.float64, device=entropy.device)
    sums_s = torch.zeros_like(sums_e)
    sums_e.index_add_(0, inverse, entropy)
    sums_s.index_add_(0, inverse, score)
    return sums_e / counts, sums_s / counts


def _inversion_stats_compute(
    entropy: Tensor,
    score: Tensor,
    tokens: Tensor | None,
    *,
    method: Method,
    per_token_type: bool,
    confidence: float,
    min_tokens: int,
) -> InversionStats:
    e_all, s_all = as_float64(entropy), as_float64(score)
    finite_e, finite_s = torch.isfinite(e_all), torch.isfinite(s_all)
    e_summary = _quantiles(e_all[finite_e], (0.1, 0.5, 0.9))
    s_summary = _quantiles(s_all[finite_s], (0.5, 0.9))
    keep = finite_e & finite_s
    e, s = e_all[keep], s_all[keep]
    n = e.numel()
    nan = math.nan
    reason = _degenerate_reason(e, s, "entropy", "score", min_n=min_tokens)
    if reason is None:
        rho_s = float(_pearson_value(_rank_average_compute(e), _rank_average_compute(s)))
        rho_p = float(_pearson_value(e, s))
        ci_s = _fisher_ci_compute(rho_s, n, "spearman", confidence)
        ci_p = _fisher_ci_compute(rho_p, n, "pearson", confidence)
    else:
        rho_s = rho_p = nan
        ci_s = ci_p = (nan, nan)
    per_type: float | None = None
    n_types: int | None = None
    if per_token_type:
        assert tokens is not None
        tok = tokens.detach().to(device=e.device)[keep]
        mean_e, mean_s = _per_type_means(e, s, tok)
        n_types = mean_e.numel()
        type_reason = _degenerate_reason(mean_e, mean_s, min_n=min_tokens)
        per_type = (
            nan
            if type_reason is not None
            else float(_pearson_value(_rank_average_compute(mean_e), _rank_average_compute(mean_s)))
        )
    return InversionStats(
        method=method,
        n=n,
        spearman=rho_s,
        pearson=rho_p,
        spearman_ci=ci_s,
        pearson_ci=ci_p,
        confidence=confidence,
        insufficient=reason is not None,
        reason=reason,
        entropy_mean=_mean(e_all[finite_e]),
        entropy_p10=e_summary[0],
        entropy_p50=e_summary[1],
        entropy_p90=e_summary[2],
        score_mean=_mean(s_all[finite_s]),
        score_p50=s_summary[0],
        score_p90=s_summary[1],
        spearman_per_token_type=per_type,
        n_token_types=n_types,
        extra={"n_nonfinite_dropped": float(entropy.numel() - n)},
    )


def inversion_stats(
    entropy: Tensor,
    score: Tensor,
    *,
    method: Method = "spearman",
    per_token_type: bool = False,
    tokens: Tensor | None = None,
    confidence: float = 0.95,
    min_tokens: int = MIN_CORRELATION_PAIRS,
) -> InversionStats:
    """The inversion statistic of one set of tokens: both coefficients, CIs and summaries.

    Steps:

    1. Pairs where entropy or score is non-finite are dropped; their count is
       ``extra["n_nonfinite_dropped"]`` and ``n`` counts the pairs kept.
    2. If fewer than ``min_tokens`` pairs remain or either value is constant,
       the result has ``insufficient=True``, a ``reason`` and NaN coefficients
       and intervals (no exception, no warning).
    3. Otherwise Spearman rho (average ranks) and Pearson r over token
       positions, each with its Fisher interval at ``confidence``.
    4. Summaries (entropy mean/p10/p50/p90, score mean/p50/p90; numpy's linear
       quantiles) use every finite value of each quantity on its own, so they
       exist even when the correlation is insufficient.
    5. ``per_token_type=True`` (needs ``tokens``, the token ids, same length)
       also averages entropy and score over all occurrences of each token id
       among the kept pairs and reports the Spearman rho of those averages in
       ``spearman_per_token_type`` (NaN when fewer than ``min_tokens`` types
       or constant) and the number of ids in ``n_token_types``. ``rho`` and the
       intervals stay over positions: the per-type value is extra.

    Args:
        entropy: per-token entropy, shape ``(n,)``, floating.
        score: per-token gradient strength, shape ``(n,)``, same device.
        method: which coefficient ``.rho`` and ``.ci`` report.
        per_token_type: also compute the per-token-id ("unique token") variant.
        tokens: integer token ids, shape ``(n,)``; only with ``per_token_type``.
        confidence: level of the intervals, in (0, 1).
        min_tokens: fewest pairs for a correlation; at least 4 (the interval needs n > 3).

    >>> entropy = torch.tensor([0.2, 1.5, 0.7, 2.2, 1.1, float("nan")])
    >>> score = torch.tensor([5.0, 2.0, 4.0, 1.5, 2.5, 3.0])
    >>> s = inversion_stats(entropy, score)
    >>> s.n, s.extra["n_nonfinite_dropped"], s.spearman, round(s.pearson, 4)
    (5, 1.0, -1.0, -0.9546)
    >>> round(s.score_mean, 4)
    3.0
    >>> inversion_stats(torch.ones(5), score[:5]).reason
    'entropy is constant over the 5 values'
    >>> tokens = torch.tensor([7, 8, 7, 9, 8, 10])
    >>> t = inversion_stats(entropy, score, per_token_type=True, tokens=tokens)
    >>> t.n_token_types, t.spearman_per_token_type
    (3, nan)
    """
    _inversion_stats_update(
        entropy,
        score,
        tokens,
        method=method,
        per_token_type=per_token_type,
        confidence=confidence,
        min_tokens=min_tokens,
    )
    return _inversion_stats_compute(
        entropy,
        score,
        tokens,
        method=method,
        per_token_type=per_token_type,
        confidence=confidence,
        min_tokens=min_tokens,
    )


# --------------------------------------------------------------------------- streaming


class InversionAccumulator:
    """Buffers (entropy, score[, token]) batches and computes :func:`inversion_stats`.

    Spearman needs every value at once, so the accumulator keeps the most
    recent ``max_tokens`` pairs: when full it drops the oldest (a sliding
    window, deterministic, no RNG) and warns once; ``n_evicted`` counts the
    dropped pairs, also reported as ``extra["n_evicted"]``. ``compute()``
    equals :func:`inversion_stats` on the concatenation of the buffered
    values. Inputs are copied (detached, float64) on their own device;
    ``update`` validates each batch so errors point at the bad call.

    >>> acc = InversionAccumulator(max_tokens=1000)
    >>> acc.update(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([3.0, 1.0, 2.0]))
    >>> acc.update(torch.tensor([1.3, 0.2]), torch.tensor([0.5, 2.5]))
    >>> s = acc.compute()
    >>> s.n, s.spearman, acc.n_buffered
    (5, -1.0, 5)
    >>> acc.reset()
    >>> acc.compute().insufficient
    True
    """

    def __init__(
        self,
        method: Method = "spearman",
        *,
        per_token_type: bool = False,
        confidence: float = 0.95,
        min_tokens: int = MIN_CORRELATION_PAIRS,
        max_tokens: int = 65_536,
    ) -> None:
        _check_options(method, per_token_type, confidence, min_tokens)
        self.max_tokens = check_int(max_tokens, "max_tokens", minimum=min_tokens)
        self.method: Method = method
        self.per_token_type = per_token_type
        self.confidence = float(confidence)
        self.min_tokens = int(min_tokens)
        self._chunks: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._size = 0
        self._evicted = 0
        self._warned = False

    @property
    def n_buffered(self) -> int:
        """Pairs currently held (at most ``max_tokens``)."""
        return self._size

    @property
    def n_evicted(self) -> int:
        """Oldest pairs dropped because the buffer was full, since the last ``reset``."""
        return self._evicted

    def update(self, entropy: Tensor, score: Tensor, tokens: Tensor | None = None) -> None:
        """Add one batch; shapes ``(n,)``; ``tokens`` iff ``per_token_type``."""
        _inversion_stats_update(
            entropy,
            score,
            tokens,
            method=self.method,
            per_token_type=self.per_token_type,
            confidence=self.confidence,
            min_tokens=self.min_tokens,
        )
        e = as_float64(entropy).clone()
        s = as_float64(score).clone()
        tok = None if tokens is None else tokens.detach().to(e.device, torch.int64, copy=True)
        self._chunks.append((e, s, tok))
        self._size += e.numel()
        self._evict()

    def _evict(self) -> None:
        excess = self._size - self.max_tokens
        if excess <= 0:
            return
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"InversionAccumulator is full (max_tokens={self.max_tokens}); dropping the "
                "oldest tokens, so statistics cover the most recent ones only",
                stacklevel=3,
            )
        self._evicted += excess
        self._size -= excess
        while excess > 0:
            e, s, tok = self._chunks[0]
            if e.numel() <= excess:
                self._chunks.pop(0)
                excess -= e.numel()
            else:
                self._chunks[0] = (e[excess:], s[excess:], None if tok is None else tok[excess:])
                excess = 0

    def compute(self) -> InversionStats:
        """:func:`inversion_stats` of the buffered pairs (insufficient when empty)."""
        if self._chunks:
            device = self._chunks[0][0].device
            e = torch.cat([c[0].to(device) for c in self._chunks])
            s = torch.cat([c[1].to(device) for c in self._chunks])
            held = [c[2].to(device) for c in self._chunks if c[2] is not None]
        else:
            e = s = torch.empty(0, dtype=torch.float64)
            held = [torch.empty(0, dtype=torch.int64)]
        tokens = torch.cat(held) if self.per_token_type else None
        result = _inversion_stats_compute(
            e,
            s,
            tokens,
            method=self.method,
            per_token_type=self.per_token_type,
            confidence=self.confidence,
            min_tokens=self.min_tokens,
        )
        return replace(result, extra={**result.extra, "n_evicted": float(self._evicted)})

    def reset(self) -> None:
        """Forget every buffered pair and the eviction count."""
        self._chunks = []
        self._size = 0
        self._evicted = 0
