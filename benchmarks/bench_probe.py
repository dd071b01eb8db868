"""Speed and memory of the probe against the brute-force reference, side by side.

Usage: python benchmarks/bench_probe.py [--device cpu|cuda] [--repeats 3]

Prints, for a tiny Llama (hidden 256, 4 layers, 8 heads, vocab 8192):

1. last layer Q+O, all 256 positions of one sequence: fast path vs brute force
   (goal >= 50x);
2. layers [0, -1], all projections, 32 sampled positions of a 4 x 256 batch:
   batched small-factor path vs brute force (goal >= 4x on CPU);
3. entropy of [8, 1024, 32000] bf16 logits: peak extra memory of
   ``token_entropy`` vs the naive ``log_softmax`` path (goal <= 25%); each
   variant runs in a fresh subprocess; on CPU the peak RSS (VmHWM) is reset
   just before the call, on GPU the allocator's peak statistics.

Also checks that fast and brute-force values agree (max relative error).
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

from inversion_monitor.app.toy.models import tiny_causal_lm
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.reference import reference_norms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], ProbeResult], device: torch.device, repeats: int) -> tuple[float, Any]:
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
    worst = 0.0
    for component, expected in ref.norms.items():
        got = fast.norms[component].double().cpu()
        exp = expected.double().cpu()
        worst = max(worst, float(((got - exp).abs() / exp.abs().clamp_min(1e-12)).max()))
    return worst


def probe_cases(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    model = tiny_causal_lm("llama", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    rows = []

    ids = torch.randint(4, 8192, (1, 257), generator=gen).to(device)
    kwargs: dict[str, Any] = {"layers": [-1], "projections": ("q", "o")}
    fast_s, fast = timed(lambda: logit_gradient_norms(model, ids, **kwargs), device, repeats)
    brute_s, brute = timed(lambda: reference_norms(model, ids, **kwargs), device, 1)
    rows.append(
        {
            "case": "last layer Q+O, 256 positions x 1 seq",
            "fast_s": fast_s,
            "brute_s": brute_s,
            "goal": 50.0,
            "rel_err": max_relative_error(fast, brute),
        }
    )

    ids = torch.randint(4, 8192, (4, 256), generator=gen).to(device)
    flat = torch.randperm(4 * 255, generator=gen)[:32]
    positions = torch.stack([flat // 255, flat % 255], dim=1).to(device)
    kwargs = {"layers": [0, -1], "positions": positions}
    fast_s, fast = timed(lambda: logit_gradient_norms(model, ids, **kwargs), device, repeats)
    brute_s, brute = timed(lambda: reference_norms(model, ids, **kwargs), device, 1)
    rows.append(
        {
            "case": "layers [0,-1], Q/K/V/O, 32 of 4x256",
            "fast_s": fast_s,
            "brute_s": brute_s,
            "goal": 4.0,
            "rel_err": max_relative_error(fast, brute),
        }
    )
    return rows


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
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(
        f"{'case':<40} {'fast s':>9} {'brute s':>9} {'speed-up':>9} {'goal':>7}  "
        f"{'max rel err':>11}"
    )
    for row in probe_cases(device, args.repeats):
        ratio = row["brute_s"] / row["fast_s"]
        verdict = "ok" if ratio >= row["goal"] else "MISSED"
        print(
            f"{row['case']:<40} {row['fast_s']:>9.4f} {row['brute_s']:>9.3f} {ratio:>8.1f}x "
            f"{row['goal']:>6.0f}x  {row['rel_err']:>11.1e}  {verdict}"
        )
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
