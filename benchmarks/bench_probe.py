"""Speed and memory of the probe, in training steps and against brute force, side by side.

Usage: python benchmarks/bench_probe.py [--device cpu|cuda] [--repeats 3] [--skip-memory]
       [--skip-brute] [--gpu-shape]

1. Probe cost in training steps (issue 15's bench shape: Llama hidden 256,
   4 layers, 8 heads, vocab 8192; one training step = forward, backward and
   AdamW on 8 x 256; probe 4 x 256, 64 targets). Each row runs the current
   probe and, side by side, the general path (the last-block one-pass path
   switched off), with the max relative error against the brute-force
   reference. Goals: last block Q/K/V/O <= 0.10 steps (must reach 0.25);
   layers [0, -1] <= 1.0 step.
   Beside each, the column "captured" times what the monitor runs before the
   optimizer step: the same probe starting from the training forward's hidden
   states at the lowest probed block (``prefix=``, the blocks below skipped),
   with its own max relative error against brute force. Every variant, the
   training step included, is timed in interleaved rounds (minimum).
2. 2,048 tokens (1 x 2048, 32 targets, last block Q/K/V/O): probe vs brute
   force (goal >= 20x; beside it, the probe from the captured prefix).
3. Entropy of [8, 1024, 32000] bf16 logits: peak extra memory of
   ``token_entropy`` vs the naive ``log_softmax`` path (goal <= 25%); each
   variant runs in a fresh subprocess; on CPU the peak RSS (VmHWM) is reset
   just before the call, on GPU the allocator's peak statistics.

GPU section (runs unchanged when CUDA is present, or with ``--gpu-shape`` on
any device): bf16, a Qwen2-0.5B-shaped model built from its config (random
weights, no download), training step on 8 x 1024 vs the probe on 4 x 1024,
64 targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import inversion_monitor.probe.gradients as probe_module
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.prefix_capture import CapturedPrefix, PrefixCapture
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.toy.models import tiny_causal_lm

try:
    from benchmarks.bench_probe_counts import qwen_half_billion
except ImportError:  # run as a script from benchmarks/
    from bench_probe_counts import qwen_half_billion  # type: ignore[no-redef]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def max_relative_error(fast: ProbeResult, ref: ProbeResult) -> float:
    """Largest relative error. A value below 1e-6 of its component's largest (a target
    whose true norm is 0, e.g. K at t = 0: both sides are float32 noise) is compared
    relative to that largest value instead."""
    worst = 0.0
    for component, expected in ref.norms.items():
        got = fast.norms[component].double().cpu()
        exp = expected.double().cpu()
        largest = float(exp.abs().max()) if exp.numel() else 0.0
        scale = torch.where(exp.abs() >= 1e-6 * largest, exp.abs(), torch.tensor(largest))
        worst = max(worst, float(((got - exp).abs() / scale.clamp_min(1e-30)).max()))
    return worst


def general_path(fn: Callable[[], ProbeResult]) -> ProbeResult:
    """Run ``fn`` with the last-block one-pass path switched off (the path before it)."""
    original = probe_module._probe_last_block
    probe_module._probe_last_block = lambda plan: {}
    try:
        return fn()
    finally:
        probe_module._probe_last_block = original


def training_step_seconds(
    model: nn.Module, shape: tuple[int, int], vocab: int, device: torch.device, repeats: int
) -> float:
    """Median time of one forward + backward + AdamW step on ``batch x length`` tokens."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, shape, generator=gen).to(device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, _ = timed(step, device, repeats)
    model.eval()
    return seconds


_CAPTURES: list[PrefixCapture] = []  # installed for the whole run (a removed one is refused)


def captured_prefix(model: nn.Module, ids: torch.Tensor, layer: int) -> CapturedPrefix:
    """The input of block ``layer`` in a training forward (and backward) of ``ids``."""
    capture = PrefixCapture(model, layer)
    _CAPTURES.append(capture)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    model.zero_grad(set_to_none=True)
    prefix = capture.latest
    if prefix is None:
        raise RuntimeError(f"no prefix captured: {capture.skipped_reason}")
    return prefix


def lowest_block(model: nn.Module, extra: dict[str, Any]) -> int:
    count = int(model.config.num_hidden_layers)
    return min(layer % count for layer in extra.get("layers", [-1]))


def sample_positions(batch: int, length: int, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch * (length - 1), generator=gen)[:count]
    return torch.stack([flat // (length - 1), flat % (length - 1)], dim=1)


def interleaved_minimum(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Minimum wall time of each function over ``rounds`` interleaved rounds (after a
    warm-up): on a shared machine the load hits every variant alike, and the minimum
    is the least disturbed run."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def step_rows(device: torch.device, repeats: int, *, brute: bool) -> list[dict[str, Any]]:
    """Issue 15's table: probe cost in training steps, current vs general path.

    Every variant, the training step included, is timed in interleaved rounds.
    """
    vocab = 8192
    shape = {"vocab_size": vocab, "hidden_size": 256, "num_layers": 4, "num_heads": 8}
    model = tiny_causal_lm("llama", **shape).to(device)  # type: ignore[arg-type]
    trained = tiny_causal_lm("llama", **shape).to(device).train()  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    train_ids = torch.randint(4, vocab, (8, 256), generator=gen).to(device)
    ids = torch.randint(4, vocab, (4, 256), generator=gen).to(device)
    positions = sample_positions(4, 256, 64).to(device)

    def step() -> None:
        trained(input_ids=train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    cases: list[tuple[str, dict[str, Any], float | None]] = [
        ("last block Q, O", {"projections": ("q", "o")}, None),
        ("last block Q, K, V, O (default)", {}, 0.10),
        ("last block V", {"projections": ("v",)}, None),
        ("last block K", {"projections": ("k",)}, None),
        ("layers [0, -1], Q, K, V, O", {"layers": [0, -1]}, 1.0),
        ("layers [1, -1], Q, K, V, O", {"layers": [1, -1]}, None),
    ]
    prefixes = {
        layer: captured_prefix(model, ids, layer)
        for layer in {lowest_block(model, extra) for _, extra, _ in cases}
    }
    results: dict[str, ProbeResult] = {}
    fns: dict[str, Callable[[], Any]] = {"step": step}
    for name, extra, _ in cases:
        kwargs = {"positions": positions, **extra}
        prefix = prefixes[lowest_block(model, extra)]

        def run(name: str = name, kwargs: dict[str, Any] = kwargs) -> None:
            results[name] = logit_gradient_norms(model, ids, **kwargs)
            _sync(device)

        def run_general(kwargs: dict[str, Any] = kwargs) -> None:
            general_path(lambda: logit_gradient_norms(model, ids, **kwargs))
            _sync(device)

        def run_captured(
            name: str = name, kwargs: dict[str, Any] = kwargs, prefix: CapturedPrefix = prefix
        ) -> None:
            results[name + " (captured)"] = logit_gradient_norms(
                model, ids, prefix=prefix, **kwargs
            )
            _sync(device)

        fns[name] = run
        fns[name + " (general)"] = run_general
        fns[name + " (captured)"] = run_captured
    best = interleaved_minimum(fns, repeats)
    step_s = best["step"]
    rows: list[dict[str, Any]] = [
        {"case": "one training step (8 x 256)", "seconds": step_s, "steps": 1.0}
    ]
    for name, extra, goal in cases:
        result = results[name]
        captured = results[name + " (captured)"]
        if captured.prefix != "captured":
            raise RuntimeError(f"{name}: prefix not used ({captured.prefix_reason})")
        row: dict[str, Any] = {
            "case": name,
            "seconds": best[name],
            "steps": best[name] / step_s,
            "goal": goal,
            "paths": sorted(set(result.paths.values())),
            "general_steps": best[name + " (general)"] / step_s,
            "captured_seconds": best[name + " (captured)"],
            "captured_steps": best[name + " (captured)"] / step_s,
        }
        if brute:
            reference = reference_norms(model, ids, positions=positions, **extra)
            row["rel_err"] = max_relative_error(result, reference)
            row["captured_rel_err"] = max_relative_error(captured, reference)
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def long_row(device: torch.device, repeats: int) -> dict[str, Any]:
    """2,048 tokens, last block Q/K/V/O: probe vs general path vs brute force."""
    vocab = 8192
    model = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=8)
    model.config.max_position_embeddings = 4096
    model.to(device)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, vocab, (1, 2048), generator=gen).to(device)
    positions = sample_positions(1, 2048, 32, seed=3).to(device)

    def run() -> ProbeResult:
        return logit_gradient_norms(model, ids, positions=positions)

    prefix = captured_prefix(model, ids, lowest_block(model, {}))
    fast_s, fast = timed(run, device, repeats)
    captured_s, captured = timed(
        lambda: logit_gradient_norms(model, ids, positions=positions, prefix=prefix),
        device,
        repeats,
    )
    general_s, _ = timed(lambda: general_path(run), device, 1)
    start = time.perf_counter()
    brute = reference_norms(model, ids, positions=positions)
    _sync(device)
    brute_s = time.perf_counter() - start
    return {
        "fast_s": fast_s,
        "captured_s": captured_s,
        "general_s": general_s,
        "brute_s": brute_s,
        "rel_err": max(max_relative_error(fast, brute), max_relative_error(captured, brute)),
    }


def gpu_rows(device: torch.device, repeats: int, length: int = 1024) -> list[dict[str, Any]]:
    """bf16, a Qwen2-0.5B-shaped model from its config: probe cost in training steps
    (rows of ``length`` tokens)."""
    model = qwen_half_billion(24).to(device)
    config = model.config
    step_s = training_step_seconds(model, (8, length), config.vocab_size, device, repeats)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config.vocab_size, (4, length), generator=gen).to(device)
    positions = sample_positions(4, length, 64).to(device)
    rows = [{"case": f"one training step (8 x {length})", "seconds": step_s, "steps": 1.0}]
    for name, extra in (
        ("last block Q, O", {"projections": ("q", "o")}),
        ("last block Q, K, V, O (default)", {}),
        ("layers [0, -1], Q, K, V, O", {"layers": [0, -1]}),
    ):
        kwargs = {"positions": positions, **extra}
        prefix = captured_prefix(model, ids, lowest_block(model, extra))

        def run(kwargs: dict[str, Any] = kwargs) -> ProbeResult:
            return logit_gradient_norms(model, ids, **kwargs)

        def run_captured(
            kwargs: dict[str, Any] = kwargs, prefix: CapturedPrefix = prefix
        ) -> ProbeResult:
            return logit_gradient_norms(model, ids, prefix=prefix, **kwargs)

        seconds, result = timed(run, device, repeats)
        captured_s, captured = timed(run_captured, device, repeats)
        before_s, _ = timed(lambda run=run: general_path(run), device, 1)
        rows.append(
            {
                "case": name,
                "seconds": seconds,
                "steps": seconds / step_s,
                "general_steps": before_s / step_s,
                "captured_seconds": captured_s,
                "captured_steps": captured_s / step_s,
                "goal": None,
                "paths": sorted({*result.paths.values(), f"prefix {captured.prefix}"}),
            }
        )
    return rows


def print_steps(rows: list[dict[str, Any]]) -> None:
    """Recomputed prefix (ms, steps), general path (steps), captured prefix (ms, steps)."""
    print(
        f"{'case':<34} {'ms':>8} {'steps':>7} {'general':>8} {'captured ms':>12} "
        f"{'steps':>7} {'goal':>5} {'rel err':>8} {'captured':>8}  paths"
    )
    for row in rows:
        general = f"{row['general_steps']:.3f}" if "general_steps" in row else ""
        goal = row.get("goal")
        verdict = ""
        if goal is not None:  # the monitor runs the captured variant before the step
            verdict = "ok" if row.get("captured_steps", row["steps"]) <= goal else "MISSED"
        captured_ms = f"{row['captured_seconds'] * 1e3:.1f}" if "captured_seconds" in row else ""
        captured = f"{row['captured_steps']:.3f}" if "captured_steps" in row else ""
        err = f"{row['rel_err']:.1e}" if "rel_err" in row else ""
        captured_err = f"{row['captured_rel_err']:.1e}" if "captured_rel_err" in row else ""
        print(
            f"{row['case']:<34} {row['seconds'] * 1e3:>8.1f} {row['steps']:>7.3f} "
            f"{general:>8} {captured_ms:>12} {captured:>7} "
            f"{'' if goal is None else f'{goal:.2f}':>5} {err:>8} {captured_err:>8}  "
            f"{','.join(row.get('paths', []))} {verdict}"
        )


_MEMORY_CHILD = r"""
import json, sys, torch
from inversion_monitor.metrics.entropy import token_entropy
variant, device = sys.argv[1], torch.device(sys.argv[2])
logits = torch.empty(8, 1024, 32000, dtype=torch.bfloat16, device=device).normal_()
def naive(x):
    log_p = torch.log_softmax(x.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)
fn = naive if variant == "naive" else token_entropy
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(logits); torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
else:
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    out = fn(logits)
    extra = status("VmHWM") - base
print(json.dumps({"extra_bytes": extra, "logits_bytes": logits.numel() * 2}))
"""


def entropy_memory(device: torch.device) -> dict[str, Any]:
    out = {}
    for variant in ("naive", "chunked"):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, variant, str(device)],
            check=True,
            capture_output=True,
            text=True,
        )
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-brute", action="store_true", help="no brute-force error column")
    parser.add_argument("--skip-long", action="store_true", help="no 2,048-token row")
    parser.add_argument("--gpu-shape", action="store_true", help="run the bf16 0.5B section")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print_steps(step_rows(device, args.repeats, brute=not args.skip_brute))
    if not args.skip_long:
        row = long_row(device, args.repeats)
        ratio = row["brute_s"] / row["fast_s"]
        print(
            f"2,048 tokens, 32 targets, last block Q/K/V/O: probe {row['fast_s']:.3f} s, "
            f"general path {row['general_s']:.3f} s, brute force {row['brute_s']:.2f} s: "
            f"{ratio:.1f}x brute force (goal >= 20x, general path "
            f"{row['brute_s'] / row['general_s']:.1f}x; from the captured prefix "
            f"{row['captured_s']:.3f} s, {row['brute_s'] / row['captured_s']:.1f}x), "
            f"max rel err {row['rel_err']:.1e}  {'ok' if ratio >= 20 else 'MISSED'}"
        )
    if device.type == "cuda" or args.gpu_shape:
        print("\nbf16, Qwen2-0.5B shape (random weights from the config):")
        print_steps(gpu_rows(device, args.repeats))
    if not args.skip_memory:
        mem = entropy_memory(device)
        naive, chunked = mem["naive"]["extra_bytes"], mem["chunked"]["extra_bytes"]
        ratio = chunked / naive
        print(
            f"entropy [8,1024,32000] bf16 ({mem['naive']['logits_bytes'] / 2**20:.0f} MiB): "
            f"peak extra naive {naive / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB, "
            f"ratio {ratio:.1%} (goal <= 25%)  {'ok' if ratio <= 0.25 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
