"""Entropy covariance (Cui et al.) against a hand-written loop."""

from __future__ import annotations

import math
import re

import pytest
import torch

from inversion_monitor.metrics.covariance import entropy_covariance, entropy_covariance_per_token
from inversion_monitor.metrics.stats import DegenerateInputWarning


def _loop_reference(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[list[list[float]], float]:
    """Plain Python: means over masked tokens, then per-token products and their mean."""
    batch, steps = logprobs.shape
    lp, adv, m = logprobs.tolist(), advantages.tolist(), mask.tolist()
    tokens = []
    for b in range(batch):
        for t in range(steps):
            if m[b][t]:
                a = adv[b] if advantages.ndim == 1 else adv[b][t]
                tokens.append((b, t, a, lp[b][t]))
    n = len(tokens)
    mean_a = sum(a for _, _, a, _ in tokens) / n
    mean_lp = sum(x for _, _, _, x in tokens) / n
    per_token = [[0.0] * steps for _ in range(batch)]
    for b, t, a, x in tokens:
        per_token[b][t] = (a - mean_a) * (x - mean_lp)
    return per_token, sum(per_token[b][t] for b, t, _, _ in tokens) / n


def _batch(seed: int, per_token_advantages: bool, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    batch, steps = 5, 9
    logprobs = -torch.rand(batch, steps, generator=g).mul(5).to(dtype)
    shape = (batch, steps) if per_token_advantages else (batch,)
    advantages = torch.randn(shape, generator=g).to(dtype)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    logprobs[~mask] = -float("inf")  # padding garbage must not leak in
    if per_token_advantages:
        advantages[~mask] = float("nan")
    return logprobs, advantages, mask


@pytest.mark.parametrize("per_token_advantages", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_loop_reference(per_token_advantages: bool, seed: int) -> None:
    logprobs, advantages, mask = _batch(seed, per_token_advantages)
    ref_tokens, ref_mean = _loop_reference(logprobs.double(), advantages.double(), mask)
    per_token = entropy_covariance_per_token(logprobs, advantages, mask)
    assert per_token.dtype == torch.float64 and per_token.shape == logprobs.shape
    torch.testing.assert_close(per_token, torch.tensor(ref_tokens, dtype=torch.float64))
    mean = entropy_covariance(logprobs, advantages, mask)
    assert mean.ndim == 0 and mean.item() == pytest.approx(ref_mean, rel=1e-12, abs=1e-15)


def test_mean_is_the_biased_covariance_of_the_masked_tokens() -> None:
    logprobs, advantages, mask = _batch(9, per_token_advantages=False)
    lp = logprobs.double()[mask]
    adv = advantages.double()[:, None].expand_as(logprobs)[mask]
    expected = ((lp - lp.mean()) * (adv - adv.mean())).mean()
    torch.testing.assert_close(entropy_covariance(logprobs, advantages, mask), expected)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_mask_dtypes_agree(mask_dtype: torch.dtype) -> None:
    logprobs, advantages, mask = _batch(2, per_token_advantages=False)
    expected = entropy_covariance(logprobs, advantages, mask)
    torch.testing.assert_close(
        entropy_covariance(logprobs, advantages, mask.to(mask_dtype)), expected
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    logprobs, advantages, mask = _batch(3, per_token_advantages=True, dtype=dtype)
    _, ref = _loop_reference(logprobs.double(), advantages.double(), mask)
    assert entropy_covariance(logprobs, advantages, mask).item() == pytest.approx(ref, rel=1e-12)


def test_positive_when_likely_tokens_get_high_advantage() -> None:
    # the regime that predicts entropy collapse: confident tokens are rewarded
    logprobs = torch.tensor([[-0.1, -0.2], [-3.0, -2.5]])
    advantages = torch.tensor([1.0, -1.0])
    assert entropy_covariance(logprobs, advantages, torch.ones(2, 2)).item() > 0


def test_gradient_flows_when_requested() -> None:
    logprobs = torch.tensor([[-0.1, -0.2, -1.0]], requires_grad=True)
    value = entropy_covariance(logprobs, torch.tensor([[1.0, 0.0, -1.0]]), torch.ones(1, 3))
    value.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_non_finite_inside_the_mask_propagates() -> None:
    logprobs = torch.tensor([[-0.1, float("nan"), -1.0]])
    value = entropy_covariance(logprobs, torch.tensor([1.0]), torch.ones(1, 3))
    assert math.isnan(value.item())


@pytest.mark.parametrize("n_masked", [0, 1])
def test_fewer_than_two_tokens_is_nan_with_a_warning(n_masked: int) -> None:
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask.view(-1)[:n_masked] = True
    logprobs = torch.full((2, 3), -1.0)
    message = f"entropy_covariance is NaN: {n_masked} masked token(s), fewer than 2"
    with pytest.warns(DegenerateInputWarning, match=re.escape(message)):
        value = entropy_covariance(logprobs, torch.ones(2), mask)
    assert math.isnan(value.item())
    per_token = entropy_covariance_per_token(logprobs, torch.ones(2), mask)
    assert per_token.abs().sum().item() == 0.0


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (
            ([[-1.0]], torch.ones(1), torch.ones(1, 1)),
            TypeError,
            "logprobs: expected a torch.Tensor, got list",
        ),
        (
            (torch.ones(2, 3, dtype=torch.int64), torch.ones(2), torch.ones(2, 3)),
            TypeError,
            "logprobs: expected a floating-point tensor",
        ),
        (
            (torch.ones(6), torch.ones(2), torch.ones(6)),
            ValueError,
            "logprobs: expected a 2-D tensor of shape (B, T), got ndim=1 with shape (6,)",
        ),
        (
            (torch.ones(2, 3), torch.ones(3), torch.ones(2, 3)),
            ValueError,
            "advantages: expected shape (B,) = (2,) or (B, T) = (2, 3) to match logprobs, got (3,)",
        ),
        (
            (torch.ones(2, 3), torch.ones(2, 3, 1), torch.ones(2, 3)),
            ValueError,
            "got (2, 3, 1)",
        ),
        (
            (torch.ones(2, 3), torch.ones(2, dtype=torch.int32), torch.ones(2, 3)),
            TypeError,
            "advantages: expected a floating-point tensor",
        ),
        (
            (torch.ones(2, 3), torch.ones(2), torch.ones(2, 4)),
            ValueError,
            "logprobs and mask: expected the same shape, got (2, 3) and (2, 4)",
        ),
        (
            (torch.ones(2, 3), torch.ones(2), torch.full((2, 3), 2)),
            ValueError,
            "mask: expected a bool or 0/1 tensor, got 6 value(s) other than 0 and 1",
        ),
        (
            (torch.ones(2, 3), torch.ones(2), -torch.ones(2, 3)),
            ValueError,
            "mask: expected a bool or 0/1 tensor",
        ),
    ],
)
def test_validation_says_expected_vs_got(args, error, message) -> None:  # type: ignore[no-untyped-def]
    for fn in (entropy_covariance, entropy_covariance_per_token):
        with pytest.raises(error, match=re.escape(message)):
            fn(*args)
