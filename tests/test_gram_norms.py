"""Norms of many G_k = Gamma_k^T X sharing X equal the dense norms, for any T and support."""

from __future__ import annotations

import pytest
import torch

from inversion_monitor.metrics.gram_norms import input_factor, shared_input_norm


def _dense(gamma: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    grads = gamma.double().transpose(1, 2) @ x.double()
    if norm == "nuclear":
        return torch.linalg.matrix_norm(grads, ord="nuc")
    if norm == "frobenius":
        return torch.linalg.matrix_norm(grads, ord="fro")
    return grads.abs().sum((-2, -1))


@pytest.mark.parametrize("norm", ["nuclear", "frobenius", "l1"])
@pytest.mark.parametrize(
    ("length", "width"), [(12, 40), (40, 12), (130, 24)], ids=["T<b", "T>b", "T>>b"]
)
def test_causal_supports_equal_the_dense_norm(norm, length, width):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(length, width, generator=gen)
    support = torch.tensor([1, 2, length // 3, width - 1, width, width + 1, length])
    support = support.clamp(1, length)
    gamma = torch.randn(support.numel(), length, 9, generator=gen)
    gamma[torch.arange(length)[None, :] >= support[:, None]] = 0.0
    expected = _dense(gamma, x, norm).float()
    for given in (support, None):  # the support only makes the problems smaller
        got = shared_input_norm(gamma, x, norm, support=given)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rows_columns_and_a_given_factor_pick_the_same_matrices():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 16, generator=gen)
    source = torch.randn(6, 50, 10, generator=gen)
    rows = torch.tensor([4, 1, 1])
    columns = torch.tensor([0, 3, 7, 8])
    support = torch.tensor([50, 20, 3])
    for k, m in enumerate(support.tolist()):
        source[rows[k], m:] = 0.0
    picked = source[rows][:, :, columns]
    for norm in ("nuclear", "frobenius", "l1"):
        got = shared_input_norm(
            source,
            x,
            norm,
            support=support,
            rows=rows,
            columns=columns,
            factor=input_factor(x, norm),
        )
        torch.testing.assert_close(got, _dense(picked, x, norm).float(), rtol=1e-5, atol=1e-6)
