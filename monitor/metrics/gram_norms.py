"""Norms of ``G_k = Gamma_k^T X`` for many targets sharing one input matrix ``X``.

In one sequence every target's weight gradient has the form
``G_k = sum_s gamma_ks x_s^T`` over the same inputs ``x_s`` (rows of ``X``,
``[T, b]``); only the output-side factor ``Gamma_k`` (``[T, a]``, zero rows
where a position does not reach target k) differs. The input side is
factored once per sequence: with ``X^T = Q R`` (``R`` ``[T, T]``),
``G_k = Gamma_k^T R^T Q^T`` and ``Q`` has orthonormal columns, so
``||G_k|| = ||R Gamma_k||`` for every unitarily invariant norm (nuclear,
Frobenius). When ``T >= b``, forming ``G_k`` (``[a, b]``) is no larger.

>>> import torch
>>> gamma = torch.tensor([[[3.0], [0.0]]]); x = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
>>> shared_input_norm(gamma, x, "nuclear")
tensor([12.])
"""

from __future__ import annotations

import torch

from inversion_monitor.metrics.norms import Norm, check_norm, nuclear_norm

# fp32 elements of the per-target small factors formed at once: 16 Mi = 64 MiB
_MAX_ELEMENTS = 1 << 24


def _input_factor(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(R, True)`` with ``X^T = Q R`` when that is no larger than ``X``, else ``(X, False)``.

    ``R`` is upper triangular, so ``R[:m, :m]`` is the factor of the first m rows of X.
    """
    length, width = x.shape
    if length <= width:
        return torch.linalg.qr(x.T, mode="r").R, True  # [T, T]
    return x, False


def _matrix_norm(matrices: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "nuclear":
        return nuclear_norm(matrices)
    if norm == "frobenius":
        frobenius: torch.Tensor = torch.linalg.matrix_norm(matrices, ord="fro")
        return frobenius
    return matrices.abs().sum((-2, -1))


def shared_input_norm(
    gamma: torch.Tensor, x: torch.Tensor, norm: Norm, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Norm of ``Gamma_k^T X`` for each k: ``gamma [K, T, a]``, ``x [T, b]`` -> ``[K]`` (fp32).

    ``support``: ``[K]`` number of leading rows of each ``Gamma_k`` that can be
    nonzero (t + 1 for a causal target t); smaller problems for short ones.
    """
    check_norm(norm)
    if gamma.ndim != 3 or x.ndim != 2 or gamma.shape[1] != x.shape[0]:
        raise ValueError(
            f"expected gamma [K, T, a] and x [T, b] with equal T, got "
            f"{tuple(gamma.shape)} and {tuple(x.shape)}"
        )
    gamma, x = gamma.float(), x.float()
    count, length, _ = gamma.shape
    if count == 0:
        return gamma.new_zeros(0)
    if norm == "l1":
        factor, small = x, False
    else:
        factor, small = _input_factor(x)
    out = torch.zeros(count, dtype=torch.float32, device=gamma.device)
    if small and support is not None:  # R[:m, :m] Gamma[:m]: m x a problems, m = support
        edges = sorted(
            {min(length, 1 << max(0, int(m - 1).bit_length())) for m in support.tolist()}
        )
        lower = 0
        for edge in edges:
            index = ((support > lower) & (support <= edge)).nonzero().flatten()
            lower = edge
            if index.numel():
                out[index] = _chunked(factor[:edge, :edge], gamma[index, :edge], norm, small)
        return out
    return _chunked(factor, gamma, norm, small)


def _chunked(factor: torch.Tensor, gamma: torch.Tensor, norm: Norm, small: bool) -> torch.Tensor:
    count, _, a = gamma.shape
    per_chunk = max(1, _MAX_ELEMENTS // max(1, a * factor.shape[-1]))
    out = []
    for start in range(0, count, per_chunk):
        part = gamma[start : start + per_chunk]
        # small: R Gamma_k ([T, a]); else G_k^T = X^T Gamma_k ([b, a]); same norm either way
        matrices = factor @ part if small else factor.T @ part
        out.append(_matrix_norm(matrices, norm))
    return torch.cat(out)
