"""The probe's small dense solves on torch's threads vs on one thread, quiet and on busy cores.

Usage: python benchmarks/bench_lapack_threads.py [--rounds 3] [--busy-rounds 1] [--busy-per-core 2]
       [--skip-busy]

Side by side in one run, interleaved: a batch of 76 rank-deficient float64
eigensolves of 128 x 128 (what the default probe solves on bench_probe.py's
shape), the batched QR of its inputs (fp32 ``[4, 256, 250]``) and the whole
captured default probe (last block Q/K/V/O, 64 targets, Llama hidden 256,
vocab 8192, 4 x 256), each with the solves on torch's intra-op threads and on
one thread (:mod:`inversion_monitor.metrics.lapack`). Then the same next to
processes that multiply matrices on torch's threads (``--busy-per-core`` per
core), as on a machine shared with other ranks or other jobs. It prints the
minimum seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from inversion_monitor.metrics import lapack
from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.toy.models import tiny_causal_lm

try:
    from benchmarks.bench_probe_counts import captured, positions
except ImportError:  # run as a script from benchmarks/
    from bench_probe_counts import captured, positions  # type: ignore[no-redef]


@contextlib.contextmanager
def solves_on_all_threads() -> Iterator[None]:
    """The solves as before this module: on torch's intra-op threads."""
    original = lapack.one_thread
    lapack.one_thread = lambda tensor: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        lapack.one_thread = original


# what another training process (a second rank, a neighbour's job) does: matmuls on all cores
_BUSY = "import torch\na = torch.randn(384, 384)\nwhile True:\n    a @ a"


@contextlib.contextmanager
def busy_cores(per_core: int) -> Iterator[int]:
    """``per_core`` processes per core running matmuls on torch's threads, for the body."""
    count = per_core * (os.cpu_count() or 1)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them reach their loops
        yield count
    finally:
        for proc in spinners:
            proc.kill()
        for proc in spinners:
            proc.wait()


def workloads() -> dict[str, Callable[[], Any]]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(76, 250, 128, generator=gen, dtype=torch.float64)
    a[:, 60:] = 0  # rank <= 60, as the probe's Gram matrices of early targets
    grams = a.mT @ a
    inputs = torch.randn(4, 256, 250, generator=gen)
    model = tiny_causal_lm("llama", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8)
    ids = torch.randint(4, 8192, (4, 256), generator=gen)
    prefix, capture = captured(model, ids)
    targets = positions(4, 256, 64)
    return {
        "eigvalsh 76 x 128 x 128 float64": lambda: lapack.eigenvalues(grams),
        "qr [4, 256, 250] fp32": lambda: lapack.qr_factor(inputs),
        # the capture stays installed while the probe runs (a removed one is refused)
        "captured default probe": lambda: (
            capture,
            logit_gradient_norms(model, ids, positions=targets, prefix=prefix),
        ),
    }


def side_by_side(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """Minimum seconds of each workload on all threads and on one, interleaved."""
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    modes: tuple[Callable[[], contextlib.AbstractContextManager[Any]], ...] = (
        solves_on_all_threads,
        contextlib.nullcontext,
    )
    for _ in range(rounds):
        for name, fn in fns.items():
            for slot, mode in enumerate(modes):
                with mode():
                    start = time.perf_counter()
                    fn()
                    best[name][slot] = min(best[name][slot], time.perf_counter() - start)
    return {name: (all_threads, one) for name, (all_threads, one) in best.items()}


def show(title: str, rows: dict[str, tuple[float, float]]) -> None:
    load = os.getloadavg()[0]
    print(f"\n{title} (load average {load:.1f}, torch threads {torch.get_num_threads()}):")
    print(f"{'workload':34} {'all threads s':>14} {'one thread s':>13} {'ratio':>8}")
    for name, (all_threads, one) in rows.items():
        print(f"{name:34} {all_threads:14.4f} {one:13.4f} {all_threads / one:7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy-rounds", type=int, default=1)
    parser.add_argument("--skip-busy", action="store_true")
    parser.add_argument("--busy-per-core", type=int, default=2, help="busy processes per core")
    args = parser.parse_args()
    fns = workloads()
    show("as the machine is", side_by_side(fns, args.rounds))
    if not args.skip_busy:
        with busy_cores(args.busy_per_core) as count:
            show(
                f"next to {count} processes multiplying matrices",
                side_by_side(fns, args.busy_rounds),
            )


if __name__ == "__main__":
    main()
