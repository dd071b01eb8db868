"""Inversion statistics: rank and linear correlation of entropy vs gradient strength.

(Implementation in progress: the result type below is the contract shared
with the client and the wire format.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Method = Literal["spearman", "pearson"]


@dataclass(frozen=True)
class InversionStats:
    """Correlation between per-token entropy and gradient strength, with summaries.

    ``rho`` is the coefficient of ``method``; both coefficients are always
    computed. When the sample cannot support a correlation (fewer than 4
    tokens, constant or non-finite values) ``insufficient`` is True,
    ``reason`` says why, and the coefficients and intervals are NaN.

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
