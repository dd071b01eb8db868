"""Matrix norms of weight gradients given in factored form, never as d x d SVDs.

For a linear map applied at positions s, the weight gradient of one scalar is
``G = sum_s g_s x_s^T = Gamma^T X`` with ``Gamma`` ``[L, a]`` (output
gradients) and ``X`` ``[L, b]`` (inputs). Its rank is at most L, so

- nuclear: with ``Gamma^T = Q1 R1`` and ``X^T = Q2 R2``, ``||G||_* = ||R1 R2^T||_*``
  (an SVD of an L x L matrix);
- Frobenius: ``||G||_F^2 = <Gamma Gamma^T, X X^T>`` (two L x L Gram matrices);
- L1 (sum of |entries|) needs the entries, so G is formed in chunks.

When L >= min(a, b) the small factors are no smaller than G, so G is formed.
Singular values come from the eigenvalues of the smaller Gram matrix in
float64 (``sigma = sqrt(eig(M M^T))``): several times faster than a batched
SVD on CPU, and exact to ~1e-7 relative for the sum.

>>> import torch
>>> g = torch.tensor([[[3.0, 0.0]]]); x = torch.tensor([[[0.0, 4.0]]])
>>> outer_sum_norm(g, x, "nuclear"), rank_one_norm(g[:, 0], x[:, 0], "nuclear")
(tensor([12.]), tensor([12.]))
"""

from __future__ import annotations

from typing import Literal

import torch

from inversion_monitor.metrics.lapack import eigenvalues, qr_factor

Norm = Literal["nuclear", "frobenius", "l1"]
NORMS = ("nuclear", "frobenius", "l1")
# fp32 elements of G formed at once by the L1 path (and direct SVD path): 64 Mi = 256 MiB
_MAX_DENSE_ELEMENTS = 1 << 26


def check_norm(norm: str) -> None:
    """Raise a clear error unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def rank_one_norm(g: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Norm of ``g_k x_k^T`` for each row k: ``[K, a]``, ``[K, b]`` -> ``[K]`` (fp32).

    >>> rank_one_norm(torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]]), "l1")
    tensor([4.])
    """
    check_norm(norm)
    g, x = g.float(), x.float()
    if norm == "l1":
        out: torch.Tensor = g.abs().sum(-1) * x.abs().sum(-1)
    else:
        out = torch.linalg.vector_norm(g, dim=-1) * torch.linalg.vector_norm(x, dim=-1)
    return out


def nuclear_norm(matrices: torch.Tensor) -> torch.Tensor:
    """Nuclear norm of each ``[p, q]`` matrix of a ``[K, p, q]`` batch, as fp32.

    >>> nuclear_norm(torch.diag(torch.tensor([3.0, -4.0]))[None])
    tensor([7.])
    """
    m = matrices.double()
    if m.shape[-2] > m.shape[-1]:
        m = m.transpose(-2, -1)
    values = eigenvalues(m @ m.transpose(-2, -1))
    nuclear: torch.Tensor = values.clamp_min(0).sqrt().sum(-1).float()
    return nuclear


def _dense(gamma: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Form G per row (in chunks bounded by ``_MAX_DENSE_ELEMENTS``) and take its norm."""
    rows, a, b = gamma.shape[0], gamma.shape[-1], x.shape[-1]
    per_chunk = max(1, _MAX_DENSE_ELEMENTS // max(1, a * b))
    out = []
    for start in range(0, rows, per_chunk):
        grad = gamma[start : start + per_chunk].transpose(1, 2) @ x[start : start + per_chunk]
        if norm == "nuclear":
            out.append(nuclear_norm(grad))
        elif norm == "frobenius":
            out.append(torch.linalg.matrix_norm(grad, ord="fro"))
        else:
            out.append(grad.abs().sum((-2, -1)))
    return torch.cat(out) if out else gamma.new_zeros(0)


def outer_sum_norm(gamma: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Norm of ``G_k = Gamma_k^T X_k`` for each k: ``[K, L, a]``, ``[K, L, b]`` -> ``[K]``.

    Computed in fp32 from small factors when L < min(a, b). Rows of zeros in
    ``Gamma`` (positions that do not reach the target) change nothing.
    """
    check_norm(norm)
    if gamma.ndim != 3 or x.ndim != 3 or gamma.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"expected gamma [K, L, a] and x [K, L, b] with equal K and L, got "
            f"{tuple(gamma.shape)} and {tuple(x.shape)}"
        )
    gamma, x = gamma.float(), x.float()
    length = gamma.shape[1]
    if norm == "l1" or length >= min(gamma.shape[-1], x.shape[-1]):
        return _dense(gamma, x, norm)
    if norm == "frobenius":
        gram = (gamma @ gamma.transpose(1, 2)) * (x @ x.transpose(1, 2))
        return gram.sum((-2, -1)).clamp_min(0).sqrt()
    r1 = qr_factor(gamma.transpose(1, 2))  # [K, L, L]
    r2 = qr_factor(x.transpose(1, 2))
    return nuclear_norm(r1 @ r2.transpose(1, 2))


def input_factor(x: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR ``X^T = Q R`` of inputs ``x`` ``[L, b]``: ``[min(L, b), L]`` (fp32).

    ``R`` is upper trapezoidal, so the first m columns ``R[:min(m, b), :m]``
    factor the first m rows of ``x`` (:func:`prefix_norms`): one QR serves
    every prefix of one sequence.

    >>> input_factor(torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])).shape
    torch.Size([2, 3])
    """
    return qr_factor(x.float().T)


def prefix_norms(
    factor: torch.Tensor, gamma: torch.Tensor, support: torch.Tensor, norm: Norm
) -> torch.Tensor:
    """Norm of ``G_k = Gamma_k[:m_k]^T X[:m_k]`` for each k, from X's :func:`input_factor`.

    ``factor`` ``[r, L]`` (``R`` of ``X^T``), ``gamma`` ``[K, L, a]``,
    ``support`` ``[K]`` (m_k, the rows of ``Gamma_k`` that count) -> ``[K]``
    fp32. With ``X[:m]^T = Q R[:, :m]`` and Q orthonormal,
    ``||G_k|| = ||R[:, :m] Gamma_k[:m]||`` for the nuclear and Frobenius
    norms: an ``[min(m, b), a]`` problem, no QR of ``Gamma``. Targets with
    equal m are one batched call (padding m would grow the eigenproblems).

    >>> x = torch.tensor([[0.0, 4.0], [1.0, 1.0]]); g = torch.tensor([[[3.0], [5.0]]])
    >>> prefix_norms(input_factor(x), g, torch.tensor([1]), "nuclear")
    tensor([12.])
    """
    if norm not in ("nuclear", "frobenius"):
        raise ValueError(f"prefix_norms computes the nuclear and Frobenius norms, not {norm!r}")
    if gamma.ndim != 3 or factor.ndim != 2 or gamma.shape[1] != factor.shape[1]:
        raise ValueError(
            f"expected factor [r, L] and gamma [K, L, a] with equal L, got "
            f"{tuple(factor.shape)} and {tuple(gamma.shape)}"
        )
    count, length, width = gamma.shape
    out = torch.zeros(count, dtype=torch.float32, device=gamma.device)
    if count == 0:
        return out
    sizes = support.to(gamma.device).clamp(1, length)
    for size in sorted(set(sizes.tolist())):
        index = (sizes == size).nonzero().flatten()
        part = gamma[index, :size].float()
        per_chunk = max(1, _MAX_DENSE_ELEMENTS // max(1, size * width))
        for start in range(0, index.numel(), per_chunk):
            chunk = index[start : start + per_chunk]
            matrices = factor[: min(size, factor.shape[0]), :size] @ part[start : start + per_chunk]
            if norm == "nuclear":
                out[chunk] = nuclear_norm(matrices)
            else:
                out[chunk] = torch.linalg.matrix_norm(matrices, ord="fro")
    return out
