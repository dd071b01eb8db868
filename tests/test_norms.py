"""Factored nuclear/Frobenius/L1 norms against forming G and taking a full SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inversion_monitor.metrics.norms import outer_sum_norm, rank_one_norm


def dense_reference(gamma: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    grads = gamma.double().transpose(1, 2) @ x.double()
    if norm == "nuclear":
        return torch.linalg.svdvals(grads).sum(-1)
    if norm == "frobenius":
        return torch.linalg.matrix_norm(grads, ord="fro")
    return grads.abs().sum((-2, -1))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 4),
    length=st.integers(1, 12),
    a=st.integers(1, 20),
    b=st.integers(1, 20),
    norm=st.sampled_from(["nuclear", "frobenius", "l1"]),
    zero_tail=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_outer_sum_norm_equals_dense_svd(k, length, a, b, norm, zero_tail, seed):
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.randn(k, length, a, generator=gen)
    x = torch.randn(k, length, b, generator=gen)
    gamma[:, max(0, length - zero_tail) :] = 0  # causal zeros after the target
    got = outer_sum_norm(gamma, x, norm)
    torch.testing.assert_close(got.double(), dense_reference(gamma, x, norm), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["nuclear", "frobenius", "l1"])
def test_rank_one_norm_equals_outer_sum_of_one_position(norm):
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(5, 9, generator=gen), torch.randn(5, 13, generator=gen)
    torch.testing.assert_close(
        rank_one_norm(g, x, norm), outer_sum_norm(g[:, None], x[:, None], norm)
    )


def test_half_precision_inputs_accumulate_in_fp32():
    gen = torch.Generator().manual_seed(4)
    gamma, x = torch.randn(2, 3, 40, generator=gen), torch.randn(2, 3, 50, generator=gen)
    got = outer_sum_norm(gamma.bfloat16(), x.bfloat16(), "nuclear")
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(),
        dense_reference(gamma.bfloat16(), x.bfloat16(), "nuclear"),
        rtol=1e-4,
        atol=1e-4,
    )


def test_shape_and_norm_validation():
    with pytest.raises(ValueError, match=r"gamma \[K, L, a\] and x \[K, L, b\]"):
        outer_sum_norm(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), "nuclear")
    with pytest.raises(ValueError, match="norm must be one of"):
        outer_sum_norm(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), "spectral")  # type: ignore[arg-type]
