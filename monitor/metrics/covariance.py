"""Entropy-collapse covariance of Cui et al. (2025): advantage vs log-probability.

Per token i of a batch (positions where ``mask`` is true),

.. math:: \\mathrm{cov}_i = (A_i - \\bar A)(\\log\\pi_i - \\overline{\\log\\pi})

with both means over the masked tokens of the whole batch (a per-sequence
advantage of shape ``(B,)`` is broadcast over its tokens first, so longer
sequences weigh more, as in the paper's per-token definition). The batch mean
of cov_i (the biased covariance) drives the change of policy entropy: large
and positive predicts falling entropy. :func:`entropy_covariance_per_token`
gives the per-token values for Clip-Cov / KL-Cov style analysis.

Computed in float64; values outside the mask are never read (they may be
``-inf`` or NaN padding). Non-finite values inside the mask propagate (NaN
result): the caller's data is wrong there, not the statistic.

>>> import torch
>>> logprobs = torch.tensor([[-0.1, -2.0, -0.5], [-1.0, -0.2, -9.9]])
>>> advantages = torch.tensor([1.0, -1.0])
>>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
>>> entropy_covariance(logprobs, advantages, mask)
tensor(-0.1280, dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from inversion_monitor._checks import (
    check_floating,
    check_mask,
    check_ndim,
    check_same_device,
    check_same_shape,
    warn_degenerate,
)

__all__ = ["entropy_covariance", "entropy_covariance_per_token"]


def _entropy_covariance_update(
    logprobs: object, advantages: object, mask: object
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate; return (logprobs, advantages broadcast to (B, T), bool mask)."""
    lp = check_floating(logprobs, "logprobs")
    check_ndim(lp, "logprobs", 2, "(B, T)")
    adv = check_floating(advantages, "advantages")
    batch, steps = lp.shape
    if adv.shape not in (torch.Size([batch]), lp.shape):
        raise ValueError(
            f"advantages: expected shape (B,) = ({batch},) or (B, T) = ({batch}, {steps}) "
            f"to match logprobs, got {tuple(adv.shape)}"
        )
    m = check_mask(mask, "mask")
    check_same_shape(lp, m, "logprobs", "mask")
    check_same_device(lp, adv, "logprobs", "advantages")
    check_same_device(lp, m, "logprobs", "mask")
    if adv.ndim == 1:
        adv = adv[:, None].expand(batch, steps)
    return lp, adv, m


def _entropy_covariance_compute(lp: Tensor, adv: Tensor, m: Tensor) -> tuple[Tensor, int]:
    """Per-token covariance (float64, 0 outside the mask) and the number of masked tokens."""
    n = int(m.sum())
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    # torch.where, not multiplication: padding may hold -inf or NaN
    lp64 = torch.where(m, lp.to(torch.float64), zero)
    adv64 = torch.where(m, adv.to(torch.float64), zero)
    if n == 0:
        return torch.zeros_like(lp64), 0
    centered_lp = lp64 - lp64.sum() / n
    centered_adv = adv64 - adv64.sum() / n
    return torch.where(m, centered_adv * centered_lp, zero), n


def entropy_covariance_per_token(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token covariance terms ``(A_i - mean A)(log pi_i - mean log pi)``, shape ``(B, T)``.

    Means are over the masked tokens of the batch. Positions outside ``mask``
    hold 0.0 (they add nothing to sums): select with ``mask`` before ranking,
    e.g. ``values[mask.bool()].topk(k)`` for Clip-Cov style selection.

    Args:
        logprobs: log pi of the sampled tokens, shape ``(B, T)``, floating.
        advantages: shape ``(B,)`` (per sequence) or ``(B, T)``, floating.
        mask: shape ``(B, T)``, bool or 0/1: the tokens that count.

    >>> per_token = entropy_covariance_per_token(
    ...     torch.tensor([[-1.0, -3.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[True, True]])
    ... )
    >>> per_token
    tensor([[1., 1.]], dtype=torch.float64)
    """
    lp, adv, m = _entropy_covariance_update(logprobs, advantages, mask)
    return _entropy_covariance_compute(lp, adv, m)[0]


def entropy_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Batch mean of the per-token covariance: Cui et al.'s entropy-change driver.

    Args: as :func:`entropy_covariance_per_token`.

    Returns:
        0-dim float64 tensor: the mean of cov_i over the masked tokens; NaN
        with a :class:`~inversion_monitor.metrics.stats.DegenerateInputWarning` when
        fewer than 2 tokens are masked in (one point has no covariance).

    >>> entropy_covariance(
    ...     torch.tensor([[-1.0, -3.0, -2.0]]), torch.tensor([[2.0, 0.0, 1.0]]), torch.ones(1, 3)
    ... )
    tensor(0.6667, dtype=torch.float64)
    """
    lp, adv, m = _entropy_covariance_update(logprobs, advantages, mask)
    per_token, n = _entropy_covariance_compute(lp, adv, m)
    if n < 2:
        warn_degenerate("entropy_covariance", f"{n} masked token(s), fewer than 2")
        return torch.tensor(math.nan, dtype=torch.float64, device=per_token.device)
    return per_token.sum() / n
