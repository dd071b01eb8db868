"""Probe time and peak memory on FSDP2-sharded weights against the unsharded model, side by side.

Usage: python benchmarks/bench_sharded.py [--world-size 2] [--device auto|cpu|cuda] [--repeats 3]

Starts ``--world-size`` processes (gloo on CPU; nccl on GPU, one GPU per
process, as many as there are, at least one). Each rank builds the same Llama
(hidden 256, 4 layers, vocab 8192), probes its own 2 x 64 batch (16 sampled
positions, layers [0, -1], Q/K/V/O) once on the plain model and once on the
model sharded with ``fully_shard`` on every block and the root, and reports:

- median probe time (sharded / unsharded: the price of gathering blocks);
- peak extra memory of the probe call (on CPU the peak of the tensor memory it
  allocated, from the profiler's allocation events; on GPU the allocator's
  peak) and the parameter bytes each
  rank holds (sharded / unsharded: goal, the probe gathers no more than the
  framework's own forward does, block by block);
- the largest relative difference of the sharded values from the unsharded
  ones (goal <= 1e-4);
- what the ranks' agreement costs: one vote (every step with the time
  budget) and one commit (before each probe), median over repeated calls.

A probe that fails on the sharded model is reported with its error, and the
unsharded numbers are still printed. The same script runs unchanged on a
machine with GPUs (``--device auto`` picks CUDA when present).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.toy.models import tiny_causal_lm

LAYERS = [0, -1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _model(device: torch.device) -> torch.nn.Module:
    model = tiny_causal_lm("llama", hidden_size=256, num_layers=4, num_heads=8, vocab_size=8192)
    return model.to(device).train()


def _batch(rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(4, 8192, (2, 64), generator=generator)
    positions = torch.stack(
        [
            torch.randint(0, 2, (16,), generator=generator),
            torch.randint(0, 63, (16,), generator=generator),
        ],
        dim=1,
    )
    return ids.to(device), positions.to(device)


def _measure(
    model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, repeats: int
) -> tuple[float, float, ProbeResult]:
    """Median seconds and peak extra MiB of one probe call."""
    device = ids.device

    def call() -> ProbeResult:
        return logit_gradient_norms(model, ids, positions=positions, layers=LAYERS)

    result = call()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = _cpu_peak_mib(call)
    return statistics.median(times), peak_mib, result


def _cpu_peak_mib(call: Callable[[], object]) -> float:
    """Peak MiB of CPU tensor memory allocated during ``call`` over what it started with.

    The profiler reports every allocation and free of the CPU allocator; their
    running sum, in time order, is the live memory the call added. (The
    process's peak RSS cannot tell: freed memory stays mapped and is reused.)
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    assert prof.profiler is not None and prof.profiler.kineto_results is not None
    raw = prof.profiler.kineto_results.events()
    memory = [e for e in raw if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for event in sorted(memory, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def _param_mib(model: torch.nn.Module) -> float:
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total / 2**20


def _rel_error(got: ProbeResult, want: ProbeResult) -> float:
    worst = 0.0
    for a, b in [(got.entropy, want.entropy), (got.score, want.score)]:
        x, y = a.double().cpu(), b.double().cpu()
        worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-12)).max()))
    return worst


def _agreement_cost(votes: int = 200, commits: int = 50) -> dict[str, float]:
    """Median microseconds of one vote and of one commit (every rank calls this)."""
    from inversion_monitor.engine.rank_agreement import RankAgreement

    agreement = RankAgreement.join(timeout_s=60.0)
    if agreement is None:
        return {}
    cost: dict[str, float] = {}
    for name, call, count in [
        ("vote_us", agreement.vote, votes),
        ("commit_us", agreement.commit, commits),
    ]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            call(True)
            times.append(time.perf_counter() - start)
        cost[name] = statistics.median(times) * 1e6
    agreement.close()
    return cost


def _worker(rank: int, job: tuple[int, int, str, int], out: Any) -> None:
    world_size, port, device_kind, repeats = job
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    from torch.distributed.fsdp import fully_shard

    ids, positions = _batch(rank, device)
    row: dict[str, Any] = {"rank": rank}
    plain = _model(device)
    row["unsharded_s"], row["unsharded_peak_mib"], reference = _measure(
        plain, ids, positions, repeats
    )
    row["unsharded_param_mib"] = _param_mib(plain)
    del plain
    sharded = _model(device)
    for block in sharded.model.layers:
        fully_shard(block)
    fully_shard(sharded)
    row["sharded_param_mib"] = _param_mib(sharded)
    try:
        row["sharded_s"], row["sharded_peak_mib"], result = _measure(
            sharded, ids, positions, repeats
        )
        row["max_rel_error"] = _rel_error(result, reference)
    except Exception as exc:  # reported, not hidden: the unsharded numbers still count
        row["sharded_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row.update(_agreement_cost())
    rows: list[Any] = [None] * world_size
    dist.all_gather_object(rows, row)
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = args.world_size
    if device == "cuda":  # one GPU per rank (NCCL refuses two ranks on one GPU)
        world_size = max(1, min(world_size, torch.cuda.device_count()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(
        _worker,
        args=((world_size, _free_port(), device, args.repeats), queue),
        nprocs=world_size,
        start_method="spawn",
    )
    rows = queue.get()
    print(f"device={device} world_size={world_size} (probe: layers {LAYERS}, 16 positions)")
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    _print_agreement(rows)
    ok = [r for r in rows if "sharded_s" in r]
    if not ok:
        print("sharded probe FAILED on every rank:", rows[0].get("sharded_error"))
        return
    time_ratio = statistics.median(r["sharded_s"] / r["unsharded_s"] for r in ok)
    param_ratio = statistics.median(r["sharded_param_mib"] / r["unsharded_param_mib"] for r in ok)
    peak = statistics.median(r["sharded_peak_mib"] for r in ok)
    peak_plain = statistics.median(r["unsharded_peak_mib"] for r in ok)
    print(f"probe time sharded/unsharded: {time_ratio:.2f}x")
    print(f"parameters held per rank sharded/unsharded: {param_ratio:.2f}x")
    whole = statistics.median(r["unsharded_param_mib"] for r in ok)
    print(
        f"probe peak extra memory: sharded {peak:.1f} MiB, unsharded {peak_plain:.1f} MiB "
        f"(gathered at the peak: {peak - peak_plain:.1f} MiB of a {whole:.1f} MiB model)"
    )
    print(f"max relative error sharded vs unsharded: {max(r['max_rel_error'] for r in ok):.2e}")


def _print_agreement(rows: list[dict[str, Any]]) -> None:
    if rows and "vote_us" in rows[0]:
        vote = statistics.median(r["vote_us"] for r in rows)
        commit = statistics.median(r["commit_us"] for r in rows)
        print(f"agreement: one vote {vote:.0f} us (per step, budget), one commit {commit:.0f} us")


if __name__ == "__main__":
    main()
