"""Dense factorisations (eigenvalues, QR) of batches of small matrices, one CPU thread each.

On the CPU, torch solves a batch of small matrices one matrix at a time, and LAPACK
splits each small solve over torch's intra-op threads. On a machine whose cores are
busy (data-loader workers, other jobs, other ranks) those threads wait for each other
at every step of the solve: on the two-core test machine at load 9, the probe's batch
of 76 float64 eigensolves of 128 x 128 took 59 s with two threads and 53 ms with one,
and the batched QR of its inputs 52 ms against 6 ms
(``benchmarks/bench_lapack_threads.py`` measures both side by side). A small solve
has too little work to share between threads anyway, so these run on one thread and
put torch's thread count back as it was. CUDA tensors are not affected.

>>> import torch
>>> eigenvalues(torch.diag(torch.tensor([4.0, 9.0]))[None]), torch.get_num_threads() > 0
(tensor([[4., 9.]]), True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread(tensor: torch.Tensor) -> Iterator[None]:
    """Run the body on one intra-op thread when ``tensor`` is on the CPU; restore after."""
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eigenvalues(matrices: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` of a ``[..., n, n]`` batch of symmetric matrices, ascending."""
    with one_thread(matrices):
        values: torch.Tensor = torch.linalg.eigvalsh(matrices)
    return values


def qr_factor(matrices: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR ``A = Q R`` of each matrix in a ``[..., m, n]`` batch."""
    with one_thread(matrices):
        factor: torch.Tensor = torch.linalg.qr(matrices, mode="r").R
    return factor
