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
    eigenvalues = torch.linalg.eigvalsh(m @ m.transpose(-2, -1))
    nuclear: torch.Tensor = eigenvalues.clamp_min(0).sqrt().sum(-1).float()
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
    r1 = torch.linalg.qr(gamma.transpose(1, 2), mode="r").R  # [K, L, L]
    r2 = torch.linalg.qr(x.transpose(1, 2), mode="r").R
    return nuclear_norm(r1 @ r2.transpose(1, 2))
