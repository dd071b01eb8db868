"""Norms of ``G_k = Gamma_k^T X`` for many targets sharing one input matrix ``X``.

In one sequence every target's weight gradient has the form
``G_k = sum_s gamma_ks x_s^T`` over the same inputs ``x_s`` (rows of ``X``,
``[T, b]``); only the output-side factor ``Gamma_k`` (``[T, a]``, zero rows
where a position does not reach target k) differs. The input side is
factored once per sequence: with ``X^T = Q R`` (``R`` ``[min(b, T), T]``,
upper trapezoidal), ``G_k = Gamma_k^T R^T Q^T`` and ``Q`` is orthogonal, so
``||G_k|| = ||R Gamma_k||`` for every unitarily invariant norm (nuclear,
Frobenius). A target whose ``Gamma_k`` has only m leading nonzero rows (a
causal target: m = t + 1) needs only ``R[:min(m, b), :m]``: a
``min(m, b) x a`` problem, grouped in buckets of similar m.

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


def input_factor(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The input side of :func:`shared_input_norm` for ``x`` ``[T, b]``.

    l1 needs the entries of G: ``X^T``. The others take ``X^T = Q R`` (``R``
    ``[min(b, T), T]``, upper trapezoidal): the first m rows of X have the factor
    ``R[:, :m]``, whose rows beyond m are zero, so
    ``||G_k|| = ||R[:min(m, b), :m] Gamma_k[:m]||``.
    """
    x = x.float()
    return x.T if norm == "l1" else torch.linalg.qr(x.T, mode="r").R


def _bucket_edge(m: int, length: int) -> int:
    """``m`` rounded up to a bucket edge (at most ~1/8 larger, never above ``length``)."""
    step = 1 << max(3, m.bit_length() - 3)
    return min(length, -(-m // step) * step)


def _matrix_norm(matrices: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "nuclear":
        return nuclear_norm(matrices)
    if norm == "frobenius":
        frobenius: torch.Tensor = torch.linalg.matrix_norm(matrices, ord="fro")
        return frobenius
    return matrices.abs().sum((-2, -1))


def shared_input_norm(
    gamma: torch.Tensor,
    x: torch.Tensor,
    norm: Norm,
    support: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Norm of ``Gamma_k^T X`` for each k: ``gamma [K, T, a]``, ``x [T, b]`` -> ``[K]`` (fp32).

    ``support``: ``[K]`` number of leading rows of each ``Gamma_k`` that can be
    nonzero (t + 1 for a causal target t); smaller problems for short ones.
    ``rows`` (``[K]``) and ``columns``: take ``Gamma_k = gamma[rows[k]][:, columns]``
    instead (only the parts needed are copied). ``factor``: ``input_factor(x, norm)``
    when the caller has it already.
    """
    check_norm(norm)
    if gamma.ndim != 3 or x.ndim != 2 or gamma.shape[1] != x.shape[0]:
        raise ValueError(
            f"expected gamma [K, T, a] and x [T, b] with equal T, got "
            f"{tuple(gamma.shape)} and {tuple(x.shape)}"
        )
    x = x.float()
    length = gamma.shape[1]
    count = gamma.shape[0] if rows is None else rows.shape[0]
    if count == 0:
        return gamma.new_zeros(0)
    if support is None:
        support = torch.full((count,), length, dtype=torch.long)
    support = support.clamp(1, length).cpu()
    if factor is None:
        factor = input_factor(x, norm)
    out = torch.zeros(count, dtype=torch.float32, device=gamma.device)
    edges = torch.tensor([_bucket_edge(int(m), length) for m in support.tolist()])
    for edge in torch.unique(edges).tolist():
        index = (edges == edge).nonzero().flatten().to(gamma.device)
        height = factor.shape[0] if norm == "l1" else min(edge, factor.shape[0])
        picked = gamma[index if rows is None else rows[index], :edge]
        if columns is not None:
            picked = picked.index_select(-1, columns.to(picked.device))
        out[index] = _chunked(factor[:height, :edge], picked.float(), norm)
    return out


def _chunked(factor: torch.Tensor, gamma: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Norms of ``factor @ Gamma_k`` (``[rows, m] @ [m, a]``), in chunks of bounded size."""
    count, _, a = gamma.shape
    per_chunk = max(1, _MAX_ELEMENTS // max(1, a * factor.shape[0]))
    out = []
    for start in range(0, count, per_chunk):
        out.append(_matrix_norm(factor @ gamma[start : start + per_chunk], norm))
    return torch.cat(out)
