"""The nuclear norm from a batch of Gram matrices: ``||A||_* = tr(sqrt(A^T A))``.

Two routes, the same numbers (within :data:`RELATIVE_ERROR`):

- ``"eigh"``: one batched float64 eigensolve, ``sum_i sqrt(lambda_i)``. The CPU's
  route: LAPACK solves a batch of 128 x 128 matrices in a few milliseconds.
- ``"newton"``: matmuls only. On a GPU a batched eigensolve of n > 32 runs one
  matrix at a time (an H200 took 46 ms for 64 matrices of 128 x 128 in
  float64, and 70-136 ms in fp32, whose Jacobi solver is slower still), while
  a float64 matrix product of that batch is a few microseconds. The coupled
  Newton-Schulz iteration ``T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z`` from
  ``Y = M / tr(M)``, ``Z = I`` keeps ``Y = M q(M)`` and ``Z = q(M)`` for a
  polynomial ``q``, so it acts on each eigenvalue ``mu`` of ``M / tr(M)``
  alone: ``p = z y`` follows ``p <- p (3 - p)^2 / 4``, rising to 1 from any
  ``mu`` in (0, 1], and ``y = sqrt(mu p)``.

The check (exact arithmetic, plus a floor of ``n^2 eps`` on the residual for
float64 rounding): the error
``sum_i sqrt(mu_i) (1 - sqrt(p_i))`` is at most ``sum_i sqrt(mu_i)(1 - p_i)``
<= ``sqrt(n sum_i mu_i (1 - p_i))`` (Cauchy-Schwarz), and
``sum_i mu_i (1 - p_i) = tr(M/tr M) - tr(Y^2) = 1 - ||Y||_F^2`` is computed
from the result. Zero eigenvalues (rank-deficient Gram matrices) stay exactly
zero and cost nothing; an eigenvalue far below ``(4/9)^k`` of the largest is
still unconverged after ``k`` steps but contributes at most ``mu`` to the
residual. Since ``tr(Y) = sum sqrt(mu_i) >= sum mu_i = 1``, the relative error
is at most ``sqrt(n (1 - ||Y||_F^2))``; where that exceeds
:data:`RELATIVE_ERROR` the matrix goes to the float64 eigensolve (one host
read of the failing set; after :data:`NEWTON_STEPS` steps only eigenvalues
below ~1e-11 of the trace can keep a matrix there).

>>> import torch
>>> a = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
>>> gram_nuclear_norm(a.mT @ a, route="newton"), gram_nuclear_norm(a.mT @ a, route="eigh")
(tensor([7.]), tensor([7.]))
"""

from __future__ import annotations

from typing import Literal

import torch

from inversion_monitor.metrics.lapack import eigenvalues

Route = Literal["eigh", "newton"]
# the largest relative error the matmul route may keep (beyond it: float64 eigensolve)
RELATIVE_ERROR = 1e-4
# coupled Newton-Schulz steps (3 launches each): eigenvalues above ~(4/9)^28 of the trace
# converge. More steps only add rounding: Z grows as 1.5^k on a Gram matrix's null space, and
# at 42 steps rank-3 matrices of n = 128 failed the check (tests/test_probe_counts.py)
NEWTON_STEPS = 32


def default_route(device: torch.device) -> Route:
    """``"newton"`` on CUDA (batched eigensolves of n > 32 run one matrix at a time there),
    ``"eigh"`` elsewhere."""
    return "newton" if device.type == "cuda" else "eigh"


def gram_nuclear_norm(gram: torch.Tensor, *, route: Route | None = None) -> torch.Tensor:
    """``sum_i sqrt(lambda_i)`` of each symmetric PSD ``[K, n, n]`` Gram matrix ``A^T A``:
    the nuclear norm of ``A``, as fp32 ``[K]``. ``route`` defaults to
    :func:`default_route` of the matrices' device (see the module's docstring)."""
    gram = gram.double()
    if route is None:
        route = default_route(gram.device)
    if route == "eigh" or gram.shape[0] == 0:
        return _eigh_norm(gram)
    value, bound = newton_trace_sqrt(gram)
    redo = (bound > RELATIVE_ERROR).nonzero().flatten()
    if redo.numel():
        value = value.index_copy(0, redo, _eigh_norm(gram[redo]).double())
    return value.float()


def _eigh_norm(gram: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = eigenvalues(gram).clamp_min(0).sqrt().sum(-1).float()
    return norms


def newton_trace_sqrt(
    gram: torch.Tensor, steps: int = NEWTON_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tr(sqrt(M)), bound)`` for each float64 PSD ``M`` of ``[K, n, n]`` by matmuls only;
    ``bound`` bounds the relative error (module docstring). An all-zero ``M`` gives 0, 0."""
    size = gram.shape[-1]
    gram_trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    nonzero = gram_trace > 0
    scale = gram_trace.clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device).expand_as(gram)
    y = gram / scale[:, None, None]
    z = eye.clone()
    for _ in range(steps):
        t = torch.baddbmm(eye, z, y, beta=1.5, alpha=-0.5)
        y, z = torch.bmm(y, t), torch.bmm(t, z)
    trace = y.diagonal(dim1=-2, dim2=-1).sum(-1)
    # 1 - ||Y||_F^2 is computed to within ~n^2 eps (rounding of the sums and the iteration);
    # eigenvalues at that level cannot be resolved, so the bound never claims less
    floor = size**2 * torch.finfo(gram.dtype).eps
    residual = (1.0 - y.square().sum((-2, -1))).clamp_min(0) + floor
    bound = (size * residual).sqrt() / trace.clamp_min(1.0)
    return trace * scale.sqrt() * nonzero, bound * nonzero
