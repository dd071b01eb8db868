"""Where one probe's time goes: per projection, per dense solve, and torch.profiler's table.

Usage: python benchmarks/bench_probe_profile.py [--device cuda] [--tiny] [--rows 20]

The 0.5B shape (Qwen2-0.5B from its config, bf16, 4 x 1,024, 64 targets, the
captured last-block prefix; ``--tiny``: a width-64 fp32 stand-in on the CPU).
It prints, each after a warm-up and timed with the device synchronised:

1. the probe of each projection alone (Q, K, V, O) and of all four;
2. every dense solve and factorisation one probe calls (``eigvalsh``, ``qr``):
   shape, dtype and seconds, timed by wrapping ``torch.linalg``;
3. the same solves' shapes timed alone on the device in float64 and float32,
   and float64 on the CPU (with the copy back), to choose where they run;
4. torch.profiler's top ops by self device time and by self host time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks import bench_probe
from benchmarks.bench_probe_counts import captured, positions, qwen_half_billion, tiny_qwen
from inversion_monitor.probe.gradients import logit_gradient_norms

PROJECTIONS: tuple[tuple[str, ...], ...] = (("q",), ("k",), ("v",), ("o",), ("q", "k", "v", "o"))


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` after one warm-up (bench_probe's timer)."""
    return bench_probe.timed(fn, device, repeats)[0]


@contextlib.contextmanager
def solve_log(device: torch.device) -> Iterator[list[tuple[str, tuple[int, ...], str, float]]]:
    """Wrap ``torch.linalg.eigvalsh`` and ``qr``: each call's name, shape, dtype, seconds."""
    log: list[tuple[str, tuple[int, ...], str, float]] = []
    originals = {name: getattr(torch.linalg, name) for name in ("eigvalsh", "qr")}

    def wrap(name: str) -> Callable[..., Any]:
        def call(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            bench_probe._sync(device)
            start = time.perf_counter()
            out = originals[name](a, *args, **kwargs)
            bench_probe._sync(device)
            log.append((name, tuple(a.shape), str(a.dtype)[6:], time.perf_counter() - start))
            return out

        return call

    for name in originals:
        setattr(torch.linalg, name, wrap(name))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=20, help="profiler table rows")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else args.device)
    model = (tiny_qwen(2) if args.tiny else qwen_half_billion(24)).to(device)
    length, repeats = (64, 2) if args.tiny else (1024, 5)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(4, vocab, (4, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    prefix, capture = captured(model, ids)
    where = positions(4, length, 64).to(device)
    try:
        print("1. one probe, by projection (median ms)")
        for projections in PROJECTIONS:

            def probe(projections: tuple[str, ...] = projections) -> Any:
                return logit_gradient_norms(
                    model, ids, positions=where, prefix=prefix, projections=projections
                )

            print(f"   {'/'.join(projections):<8} {timed(probe, device, repeats) * 1e3:9.1f}")

        def full() -> Any:
            return logit_gradient_norms(model, ids, positions=where, prefix=prefix)

        print("2. dense solves in one probe (each synchronised)")
        with solve_log(device) as log:
            full()
        for name, shape, dtype, seconds in log:
            print(f"   {name:<9} {shape!s:<22} {dtype:<8} {seconds * 1e3:8.2f} ms")
        print("3. the same shapes alone (median ms): device f64, device f32, cpu f64 + copies")
        for name, shape, _, _ in {(n, s, "", 0.0) for n, s, _, _ in log}:
            gen = torch.Generator().manual_seed(1)
            a = torch.randn(shape, generator=gen, dtype=torch.float64)
            if name == "eigvalsh":
                a = a @ a.transpose(-2, -1)
            fn = getattr(torch.linalg, name)
            on64, on32 = a.to(device), a.to(device).float()
            row = [
                timed(functools.partial(fn, on64), device, repeats),
                timed(functools.partial(fn, on32), device, repeats),
                timed(lambda x=on64, fn=fn: fn(x.cpu()), device, repeats),
            ]
            print(f"   {name:<9} {shape!s:<22} " + " ".join(f"{s * 1e3:8.2f}" for s in row))
        print("4. torch.profiler, one probe")
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        full()
        bench_probe._sync(device)
        with profile(activities=activities) as prof:
            full()
            bench_probe._sync(device)
        averages = prof.key_averages()
        if device.type == "cuda":
            print(
                averages.table(
                    sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=40
                )
            )
        print(
            averages.table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40
            )
        )
    finally:
        capture.remove()


if __name__ == "__main__":
    main()
