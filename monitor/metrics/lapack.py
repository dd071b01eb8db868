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

A batch of such solves is still one LAPACK call per matrix on one thread, so
:func:`eigenvalues` splits a large enough batch into ``torch.get_num_threads()``
contiguous parts, each one batched call on its own Python thread (torch releases
the GIL), each on one intra-op thread: the same calls on the same matrices, so the
same bits as one call. It stays one call inside a ``TorchDispatchMode`` (modes are
per thread: counting, :mod:`inversion_monitor.probe.op_counts`, sees one solve).

>>> import torch
>>> eigenvalues(torch.diag(torch.tensor([4.0, 9.0]))[None]), torch.get_num_threads() > 0
(tensor([[4., 9.]]), True)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# matrices per part below which a batch is not split (threads cost ~0.1 ms to start)
MIN_MATRICES_PER_THREAD = 4


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
    """``torch.linalg.eigvalsh`` of a ``[..., n, n]`` batch of symmetric matrices, ascending
    (a ``[K, n, n]`` batch on the CPU split over threads: :func:`split_batch`)."""
    threads = torch.get_num_threads()
    with one_thread(matrices):
        if matrices.ndim == 3 and matrices.device.type == "cpu":
            return split_batch(torch.linalg.eigvalsh, matrices, threads)
        values: torch.Tensor = torch.linalg.eigvalsh(matrices)
    return values


def split_batch(
    solve: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, threads: int
) -> torch.Tensor:
    """``solve(batch)`` for a batch along dim 0, as ``threads`` contiguous parts solved on
    Python threads and concatenated in order; one call where there is one thread, the
    batch is small (:data:`MIN_MATRICES_PER_THREAD`) or a dispatch mode is active. An
    exception in any part is raised here once every thread has ended.

    >>> x = torch.arange(12.0).reshape(12, 1, 1)
    >>> torch.equal(split_batch(torch.linalg.eigvalsh, x, 3), torch.linalg.eigvalsh(x))
    True
    """
    parts = min(threads, batch.shape[0] // MIN_MATRICES_PER_THREAD)
    if parts <= 1 or _get_current_dispatch_mode() is not None:
        return solve(batch)
    pieces = list(torch.tensor_split(batch, parts))
    results: list[torch.Tensor | None] = [None] * parts
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = solve(pieces[index])
        except BaseException as error:  # raised in the caller below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, parts)]
    try:
        for worker in workers:
            worker.start()
        work(0)
    finally:
        for worker in workers:
            if worker.ident is not None:
                worker.join()
    if errors:
        raise errors[0]
    return torch.cat([r for r in results if r is not None])


def qr_factor(matrices: torch.Tensor) -> torch.Tensor:
    """``R`` of the thin QR ``A = Q R`` of each matrix in a ``[..., m, n]`` batch."""
    with one_thread(matrices):
        factor: torch.Tensor = torch.linalg.qr(matrices, mode="r").R
    return factor
