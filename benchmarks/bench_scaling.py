"""How the last-block probe grows with width and context, against one decoder layer's training step.

Usage: python benchmarks/bench_scaling.py [--device cpu|cuda] [--full] [--rounds 1]
       [--skip-long] [--json PATH]

1. Grid. For each (d, T): the captured last-block Q/K/V/O probe (64 targets of
   4 x T, what the monitor runs before the optimizer step) against ONE decoder
   layer's training step (forward + backward on 8 x T). Llama blocks, head
   dimension 64, GQA 4:1 (d / 64 query heads, a quarter as many key-value
   heads), intermediate 8/3 d rounded up to 64, vocab 8,192, sdpa, fp32 on CPU
   (bf16 on CUDA); the probe's model has one layer (the captured probe runs
   only the last block and the head, whatever the depth). Both are timed in
   interleaved rounds after a warm-up (minimum; the warm-up counts FLOPs).
   Default (reduced, ~10 minutes on 2 loaded cores): d 256 / 512 / 1,024 at
   T 256, d 256 / 512 at T 1,024, d 256 at T 2,048. ``--full``: d 256 / 512 /
   1,024 / 2,048 x T 256 / 1,024 / 4,096 (hours on 2 CPU cores; minutes on a GPU).
2. Cost model, fitted on the grid and printed predicted vs measured. FLOPs
   and bytes are closed forms in (d, T, heads H, kv heads H_kv, intermediate
   I, vocab V, targets N) with head dimension h = d / H, kv width
   k = H_kv h, r = min(T, d):

   layer step (B = 8): F = 3 [2 B T (2 d^2 + 2 d k + 3 d I) + 4 B T^2 d]
   (forward, then a backward of twice its cost), bytes = 4 B T (24 d + 9 I).

   probe (4 x T rows, N targets): the block forward 2 B_p T (2 d^2 + 2 d k +
   3 d I) + 4 B_p T^2 d, the backward to the attention output 2 B_p T (d^2 +
   3 d I), the head at the targets 4 N d V, the replays (one query row per
   target) 6 N T d, one QR per row 4 B_p T d r, K's Gram factors 2 N r T k
   and its eigensolves 10 N k^3 (V has no RoPE: its rank <= H route is
   negligible); bytes = 4 [B_p T (12 d + 4 I) + 6 N T k + N V].

   Seconds = a F + b bytes + c, with (a, b, c) >= 0 fitted per program
   (non-negative least squares on relative error). The matmul terms are
   checked against torch's FlopCounterMode (load-free counts; it does not
   count CPU attention, QR or eigensolves), column ``mm/counted``.
   The fitted model is extrapolated to real shapes (random weights are never
   built), probe / layer-step and probe / full training step (layers x one
   layer; the embedding and the head's own step left out, so the fraction is
   an upper bound):

   ======  ========================================  =====  ======  ===  ===  ======  ======
   name    source (published config.json)            d      I       H    kv   layers  vocab
   ======  ========================================  =====  ======  ===  ===  ======  ======
   1.5B    Qwen/Qwen2-1.5B (Qwen2Config)             1536   8960    12   2    28      151936
   7B      Qwen/Qwen2-7B (Qwen2Config)               3584   18944   28   4    28      152064
   32B     Qwen/Qwen2.5-32B (Qwen2Config)            5120   27648   40   8    64      152064
   70B     meta-llama/Meta-Llama-3-70B (LlamaConfig) 8192   28672   64   8    80      128256
   ======  ========================================  =====  ======  ===  ===  ======  ======

   at T 4,096 (training batch 8 x T, probe 4 x T, 64 targets).
3. Long context: the first probe (d 256, 1 x T, 64 targets, captured prefix;
   the first probe of a block also runs its one-time checks, on a probe of the
   targets in the first 1,024 positions) at T 4,096 / 8,192 / 16,384 (``--full``: and 2,048) with
   its peak memory: on CPU the peak RSS
   above the RSS just before the call, in a fresh subprocess per T with glibc's
   mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536: every large tensor is
   its own mapping, returned when freed, so the high-water mark is the live
   tensors' peak); on CUDA the allocator's peak. The bound printed is the
   least-squares line through the points (bytes per token and a constant):
   the probe holds O(T) state (the block's activations of one row, each
   target's T x k gradient factors in chunks of at most 32 Mi elements); no
   T x T matrix is materialised by the CPU attention kernel.

Figures (reduced grid, CPU, 2 cores at load average 10-16, one timed round):
probe / layer step 1.00 / 1.17 / 4.25 at d 256 / 512 / 1,024 (T 256), 1.35 /
2.69 at d 256 / 512 (T 1,024), 1.48 at d 256 (T 2,048). Matmul FLOPs:
layer formula / counted 1.000 at every point, probe 0.93-0.95. Fit: median
error 36%, max 71% (the load: the layer step's time was not monotone in its
FLOPs); the probe ran at ~7 GFLOP/s, the layer step at ~70. In FLOPs (no
load in them) the probe is 0.33-0.35 of a layer step at T 4,096 for all four
real shapes: 1.2 / 1.2 / 0.55 / 0.42% of the decoder's training FLOPs for
1.5B / 7B / 32B / 70B. Long context: 298 / 584 / 830 MiB at T 4,096 /
8,192 / 16,384, line 42.4 KiB x T + 174 MiB (worst point 1.14x the line: the
replay and cotangent chunks reach their caps); it was 648 / 1,016 / 1,649 MiB.
The issue's first measurement (probe / layer 0.79 / 0.73 / 0.48 at d 256 /
512 / 1,024, T 256) used a lighter load; on this machine's load the ratios
move by 2-4x between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.prefix_capture import CapturedPrefix, PrefixCapture

TARGETS = 64
TRAIN_ROWS = 8
PROBE_ROWS = 4
VOCAB = 8192
HEAD_DIM = 64
REDUCED_GRID = [(256, 256), (512, 256), (1024, 256), (256, 1024), (512, 1024), (256, 2048)]
FULL_GRID = [(d, t) for t in (256, 1024, 4096) for d in (256, 512, 1024, 2048)]
REDUCED_LENGTHS = (4096, 8192, 16384)
FULL_LENGTHS = (2048, *REDUCED_LENGTHS)


@dataclass(frozen=True)
class Shape:
    """A decoder's shape: what the cost model needs."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    source: str = ""

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


# published config.json values (the transformers config classes they load into)
REAL_SHAPES = (
    Shape("1.5B", 1536, 8960, 12, 2, 28, 151_936, "Qwen/Qwen2-1.5B (Qwen2Config)"),
    Shape("7B", 3584, 18944, 28, 4, 28, 152_064, "Qwen/Qwen2-7B (Qwen2Config)"),
    Shape("32B", 5120, 27648, 40, 8, 64, 152_064, "Qwen/Qwen2.5-32B (Qwen2Config)"),
    Shape("70B", 8192, 28672, 64, 8, 80, 128_256, "meta-llama/Meta-Llama-3-70B (LlamaConfig)"),
)


def grid_shape(hidden: int, layers: int = 1) -> Shape:
    """The grid's shape at width ``hidden``: head dim 64, GQA 4:1, I = 8/3 d (to 64)."""
    heads = max(4, hidden // HEAD_DIM)
    intermediate = 64 * math.ceil(8 * hidden / 3 / 64)
    return Shape(f"d{hidden}", hidden, intermediate, heads, heads // 4, layers, VOCAB)


# ----------------------------------------------------------------------- cost model


Cost = tuple[float, float, float]
"""(FLOPs, bytes, the FLOPs of matmuls alone: what torch's FlopCounterMode counts on CPU)."""


def layer_step_cost(s: Shape, length: int, rows: int = TRAIN_ROWS) -> Cost:
    """One decoder layer's forward + backward on ``rows x length`` (module docstring)."""
    d, k, i = s.hidden, s.kv_width, s.intermediate
    tokens = rows * length
    matmul = 3.0 * 2 * tokens * (2 * d * d + 2 * d * k + 3 * d * i)
    attention = 3.0 * 4 * rows * length**2 * d
    return matmul + attention, 4.0 * tokens * (24 * d + 9 * i), matmul


def probe_cost(s: Shape, length: int, rows: int = PROBE_ROWS, targets: int = TARGETS) -> Cost:
    """The captured last-block Q/K/V/O probe (module docstring)."""
    d, k, i, v, n = s.hidden, s.kv_width, s.intermediate, s.vocab, targets
    tokens = rows * length
    r = min(length, d)
    matmul = (
        2 * tokens * (2 * d * d + 2 * d * k + 3 * d * i)  # the block's forward
        + 2 * tokens * (d * d + 3 * d * i)  # backward to the attention output (inputs only)
        + 4 * n * d * v  # the head at the targets, forward and backward
        + 2 * n * r * length * k  # K's Gram factors R_b Gamma_k
    )
    other = (
        4 * rows * length**2 * d  # the attention's forward
        + 6 * n * length * d  # the replays: one query row per target
        + 4 * rows * length * d * r  # one QR per row
        + 10 * n * k**3  # K's eigensolves
    )
    data = 4.0 * (tokens * (12 * d + 4 * i) + 6 * n * length * k + n * v)
    return float(matmul + other), data, float(matmul)


@dataclass(frozen=True)
class Fit:
    """Seconds = per_flop * FLOPs + per_byte * bytes + fixed."""

    per_flop: float
    per_byte: float
    fixed: float

    def seconds(self, cost: Cost) -> float:
        return self.per_flop * cost[0] + self.per_byte * cost[1] + self.fixed


def fit(costs: list[Cost], seconds: list[float]) -> Fit:
    """Non-negative least squares on relative error (every point weighs alike)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([[f, b, 1.0] for f, b, _ in costs]) / np.array(seconds)[:, None]
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, np.ones(len(seconds)))
    x = x / scale
    return Fit(float(x[0]), float(x[1]), float(x[2]))


# ----------------------------------------------------------------------- models


def llama(s: Shape, device: torch.device, dtype: torch.dtype, max_positions: int) -> nn.Module:
    """A random-weight Llama of shape ``s``, created on ``device`` (seeded, the global RNGs
    restored)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_step_fn(model: nn.Module, rows: int, length: int) -> Callable[[], None]:
    """One decoder layer's forward + backward (parameter gradients) on ``rows x length``."""
    layer = model.model.layers[0]
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, length, param.shape[-1], generator=gen)
    hidden = hidden.to(device=param.device, dtype=param.dtype).requires_grad_(True)
    position_ids = torch.arange(length, device=param.device)[None].expand(rows, -1)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    cotangent = torch.randn(hidden.shape, generator=gen).to(hidden)
    layer.train()

    def step() -> None:
        out = layer(hidden, position_embeddings=(cos, sin), position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(cotangent)
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        _sync(param.device)

    return step


def captured(model: nn.Module, ids: torch.Tensor) -> tuple[CapturedPrefix, PrefixCapture]:
    """The last block's input in a training-mode forward of ``ids``."""
    capture = PrefixCapture(model, -1)
    model.train()
    with torch.enable_grad():
        model(input_ids=ids)
    model.eval()
    prefix = capture.latest
    if prefix is None:
        raise RuntimeError(f"no prefix captured: {capture.skipped_reason}")
    return prefix, capture


def sample_positions(rows: int, length: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(rows * (length - 1), generator=gen)[:count]
    return torch.stack([flat // (length - 1), flat % (length - 1)], dim=1)


def probe_fn(
    model: nn.Module, rows: int, length: int, targets: int = TARGETS
) -> tuple[Callable[[], None], PrefixCapture]:
    """The captured last-block Q/K/V/O probe on ``rows x length`` (its capture stays installed)."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, model.config.vocab_size, (rows, length), generator=gen)
    ids = ids.to(param.device)
    prefix, capture = captured(model, ids)
    positions = sample_positions(rows, length, targets).to(param.device)

    def probe() -> None:
        result = logit_gradient_norms(model, ids, positions=positions, prefix=prefix)
        if result.prefix != "captured" or set(result.paths.values()) != {"last_block"}:
            raise RuntimeError(f"not the captured last-block path: {result.paths}")
        _sync(param.device)

    return probe, capture


def interleaved_minimum(
    fns: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Minimum wall time of each function over interleaved rounds, and the FLOPs each
    counted in its warm-up (torch's FlopCounterMode: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = int(counter.get_total_flops())
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, flops


def grid_point(
    hidden: int, length: int, device: torch.device, dtype: torch.dtype, rounds: int
) -> dict[str, Any]:
    """One (d, T): probe and layer step, timed side by side, with counted FLOPs."""
    s = grid_shape(hidden)
    model = llama(s, device, dtype, max(length, 512))
    step = layer_step_fn(model, TRAIN_ROWS, length)
    probe, capture = probe_fn(model, PROBE_ROWS, length)
    try:
        best, flops = interleaved_minimum({"layer": step, "probe": probe}, rounds)
    finally:
        capture.remove()
    return {
        "d": hidden,
        "T": length,
        "shape": asdict(s),
        "layer_s": best["layer"],
        "probe_s": best["probe"],
        "ratio": best["probe"] / best["layer"],
        "layer_flops_counted": flops["layer"],
        "probe_flops_counted": flops["probe"],
        "layer_cost": layer_step_cost(s, length),
        "probe_cost": probe_cost(s, length),
    }


# ----------------------------------------------------------------------- long context

_MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from benchmarks.bench_scaling import grid_shape, llama, probe_fn
length, device, dtype = int(sys.argv[1]), torch.device(sys.argv[2]), getattr(torch, sys.argv[3])
model = llama(grid_shape(256), device, dtype, length)
probe, capture = probe_fn(model, 1, length)
# no warm-up: the first probe (it also verifies the replayed backward once) is the largest
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import time
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter(); probe(); seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated() - base
else:
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) := the current RSS
    base = status("VmRSS")
    start = time.perf_counter(); probe(); seconds = time.perf_counter() - start
    extra = status("VmHWM") - base
print(json.dumps({"T": length, "extra_bytes": extra, "seconds": seconds}))
"""


def long_context(
    device: torch.device, dtype: torch.dtype, lengths: tuple[int, ...]
) -> dict[str, Any]:
    """The probe's peak extra memory at each length (a fresh subprocess each), its linear bound."""
    import numpy as np

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for length in lengths:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(length), str(device), str(dtype)[6:], root],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ts = np.array([r["T"] for r in rows], dtype=float)
    peaks = np.array([r["extra_bytes"] for r in rows], dtype=float)
    slope, intercept = np.polyfit(ts, peaks, 1)
    worst = float(max(peaks / (slope * ts + intercept)))
    return {
        "rows": rows,
        "bytes_per_token": float(slope),
        "constant_bytes": float(intercept),
        "worst_over_line": worst,
    }


# ----------------------------------------------------------------------- report


def _cost(value: Any) -> Cost:
    flops, data, matmul = value
    return float(flops), float(data), float(matmul)


def report(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit the cost model on ``points``, print predicted vs measured and the extrapolation."""
    fits = {
        kind: fit([_cost(p[f"{kind}_cost"]) for p in points], [p[f"{kind}_s"] for p in points])
        for kind in ("layer", "probe")
    }
    print(
        f"\n{'d':>5} {'T':>5} {'layer ms':>9} {'pred':>9} {'probe ms':>9} {'pred':>9} "
        f"{'probe/layer':>11} {'pred':>6} {'layer mm/counted':>16} {'probe mm/counted':>16}"
    )
    errors = []
    for p in points:
        pl = fits["layer"].seconds(_cost(p["layer_cost"]))
        pp = fits["probe"].seconds(_cost(p["probe_cost"]))
        errors += [abs(pl / p["layer_s"] - 1), abs(pp / p["probe_s"] - 1)]
        print(
            f"{p['d']:>5} {p['T']:>5} {p['layer_s'] * 1e3:>9.1f} {pl * 1e3:>9.1f} "
            f"{p['probe_s'] * 1e3:>9.1f} {pp * 1e3:>9.1f} {p['ratio']:>11.3f} {pp / pl:>6.3f} "
            f"{p['layer_cost'][2] / max(p['layer_flops_counted'], 1):>16.3f} "
            f"{p['probe_cost'][2] / max(p['probe_flops_counted'], 1):>16.3f}"
        )
    for kind, f in fits.items():
        print(
            f"fit {kind}: {f.per_flop * 1e9:.3f} s/GFLOP ({1 / max(f.per_flop, 1e-30) / 1e9:.1f} "
            f"GFLOP/s), {f.per_byte * 1e9:.3f} s/GB, fixed {f.fixed * 1e3:.1f} ms"
        )
    print(
        f"cost model: max relative error {max(errors):.1%}, "
        f"median {sorted(errors)[len(errors) // 2]:.1%}"
    )
    extrapolated = []
    length = 4096
    print(f"\nextrapolated at T {length} (fitted constants of this machine):")
    print(f"{'shape':<6} {'probe/layer':>11} {'probe/step':>10}  probe GFLOP  layer GFLOP")
    for s in REAL_SHAPES:
        pc, lc = probe_cost(s, length), layer_step_cost(s, length)
        ratio = fits["probe"].seconds(pc) / fits["layer"].seconds(lc)
        extrapolated.append(
            {"shape": asdict(s), "probe_over_layer": ratio, "probe_over_step": ratio / s.layers}
        )
        print(
            f"{s.name:<6} {ratio:>11.3f} {ratio / s.layers:>10.4f}  {pc[0] / 1e9:>11.0f} "
            f"{lc[0] / 1e9:>11.0f}   ({s.source}: d {s.hidden}, I {s.intermediate}, "
            f"H {s.heads}, kv {s.kv_heads}, {s.layers} layers, V {s.vocab})"
        )
    return {
        "fits": {k: asdict(v) for k, v in fits.items()},
        "max_rel_err": max(errors),
        "extrapolated": extrapolated,
    }


def run(
    device: torch.device,
    grid: list[tuple[int, int]],
    rounds: int,
    lengths: tuple[int, ...],
) -> dict[str, Any]:
    """The whole benchmark; returns its figures (``bench_gpu.py`` calls this)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(
        f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  {dtype}"
    )
    print(f"{'d':>5} {'T':>5} {'layer ms':>9} {'probe ms':>9} {'probe/layer':>11}")
    points = []
    for hidden, length in grid:
        p = grid_point(hidden, length, device, dtype, rounds)
        points.append(p)
        print(
            f"{hidden:>5} {length:>5} {p['layer_s'] * 1e3:>9.1f} {p['probe_s'] * 1e3:>9.1f} "
            f"{p['ratio']:>11.3f}",
            flush=True,
        )
    out: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "points": points}
    if len(points) >= 3:
        out["model"] = report(points)
    if lengths:
        memory = long_context(device, dtype, lengths)
        out["long_context"] = memory
        print("\nlong context (d 256, 1 x T, 64 targets, captured prefix):")
        for row in memory["rows"]:
            print(
                f"  T {row['T']:>6}: peak extra {row['extra_bytes'] / 2**20:>8.1f} MiB, "
                f"{row['seconds']:.2f} s (first probe)"
            )
        print(
            f"  bound: peak <= {memory['bytes_per_token'] / 2**10:.1f} KiB x T + "
            f"{memory['constant_bytes'] / 2**20:.1f} MiB (least-squares line; worst point "
            f"{memory['worst_over_line']:.2f}x the line)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the whole grid (hours on 2 CPU cores)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up")
    parser.add_argument("--skip-long", action="store_true", help="no long-context memory rows")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    grid = FULL_GRID if args.full else REDUCED_GRID
    lengths = FULL_LENGTHS if args.full else REDUCED_LENGTHS
    out = run(torch.device(args.device), grid, args.rounds, () if args.skip_long else lengths)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
