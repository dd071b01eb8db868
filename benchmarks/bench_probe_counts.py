"""Per probe: aten ops, host syncs, dense solves and memory, at 64 and 256 targets (any machine).

Usage: python benchmarks/bench_probe_counts.py [--device cpu|cuda] [--shape small|0.5b|both]
       [--layers 24] [--targets 64 256] [--memory-width 512 --lengths 256 1024 4096]

Counted with :class:`~inversion_monitor.probe.op_counts.OpCounter` (a
``TorchDispatchMode``) around one probe after a warm-up (the first probe of an
attention module also verifies its replayed backward once): last block Q/K/V/O,
from the captured prefix (what the monitor runs before the optimizer step).
The counts come from the program, not the device, so they are the same on CPU
and CUDA. Memory is counted from the program too: the largest storage one op
allocated (views such as the head weight's transpose ``t`` are not
allocations) and the peak bytes of storage allocated during the probe and live
at once, beyond its inputs (the model, the ids and the captured prefix).

Shapes:

- ``small``: bench_probe.py's bench shape (Llama hidden 256, 4 layers, 8 heads,
  vocab 8192), fp32, 4 x 256.
- ``0.5b``: Qwen2-0.5B's shape from transformers' config class (hidden 896,
  14 query / 2 key-value heads, intermediate 4864, vocab 151,936, tied
  embeddings; random weights), bf16, 4 x 1024. ``--layers`` sets the depth
  (default 24); the captured probe runs only the last block and the head, so
  the counts do not depend on it, and a shallower stand-in (``--layers 2``)
  makes the capturing training forward affordable on a CPU.

- ``--memory-width d``: peak memory against the sequence length instead: a
  one-block Llama-3-8B-shaped stand-in of width ``d`` (heads of 128, a quarter
  as many key/value heads, MLP 3.5 d, vocab 128,256, bf16), 4 rows of each of
  ``--lengths`` tokens, 64 targets. It prints the peak extra bytes and the
  captured prefix's bytes (the probed rows' ``[rows, T, d]`` hidden states):
  peak / prefix flat in T means memory grows with T no faster than the prefix.

Goals (issue 30, 0.5B shape, 64 targets): <= 16 syncs, <= 1,500 ops, no more
than 10% more at 256 targets, <= 8 dense solves at any count.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from inversion_monitor.probe.gradients import logit_gradient_norms
from inversion_monitor.probe.op_counts import OpCounter
from inversion_monitor.probe.prefix_capture import CapturedPrefix, PrefixCapture
from inversion_monitor.toy.models import tiny_causal_lm


def seeded_model(config: Any, seed: int = 0) -> nn.Module:
    """``config``'s model with sdpa attention and random weights drawn from ``seed`` (the
    global RNG restored around the draw)."""
    import transformers

    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = transformers.AutoModelForCausalLM.from_config(config)
    return model


def qwen_config(layers: int, **overrides: Any) -> Any:
    """Qwen2-0.5B's shape from its config class (``overrides`` replace fields)."""
    import transformers

    fields: dict[str, Any] = {
        "vocab_size": 151_936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": layers,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    return transformers.Qwen2Config(**{**fields, **overrides})


def qwen_half_billion(layers: int) -> nn.Module:
    """Qwen2-0.5B's shape from its config class, random weights, bf16."""
    return seeded_model(qwen_config(layers)).to(torch.bfloat16)


def tiny_qwen(layers: int = 2, vocab: int = 512) -> nn.Module:
    """A width-64 Qwen2 in fp32 (random weights): the dry runs' stand-in for the 0.5B shape
    (bf16 matmuls crawl on CPUs without bf16 units; a dry run checks the wiring)."""
    config = qwen_config(
        layers,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return seeded_model(config)


def llama_stand_in(width: int, length: int) -> nn.Module:
    """One decoder block of Llama-3-8B's proportions at ``width``, random weights, bf16."""
    import transformers

    heads = max(1, width // 128)
    config = transformers.LlamaConfig(
        vocab_size=128_256,
        hidden_size=width,
        intermediate_size=width * 7 // 2,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=length,
    )
    return seeded_model(config).to(torch.bfloat16)


def captured(model: nn.Module, ids: torch.Tensor) -> tuple[CapturedPrefix, PrefixCapture]:
    """The last block's input in a training-mode forward of ``ids`` (no backward needed;
    logits of the last position only)."""
    capture = PrefixCapture(model, -1)
    model.train()
    with torch.enable_grad():
        model(input_ids=ids, logits_to_keep=1)
    model.eval()
    prefix = capture.latest
    if prefix is None:
        raise RuntimeError(f"no prefix captured: {capture.skipped_reason}")
    return prefix, capture


def positions(batch: int, length: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(batch * (length - 1), generator=gen)[:count]
    return torch.stack([flat // (length - 1), flat % (length - 1)], dim=1)


def count_probe(
    model: nn.Module, ids: torch.Tensor, prefix: CapturedPrefix, targets: torch.Tensor
) -> dict[str, Any]:
    """Counts and wall time of one captured last-block Q/K/V/O probe (after a warm-up)."""
    logit_gradient_norms(model, ids, positions=targets, prefix=prefix)
    start = time.perf_counter()
    with OpCounter() as counts:
        result = logit_gradient_norms(model, ids, positions=targets, prefix=prefix)
    seconds = time.perf_counter() - start  # includes the dispatch mode's own overhead
    if result.prefix != "captured" or set(result.paths.values()) != {"last_block"}:
        raise RuntimeError(f"not the captured last-block path: {result.paths} {result.prefix}")
    return {
        "ops": counts.ops,
        "syncs": counts.syncs,
        "solves": counts.solves,
        "sync_ops": dict(counts.sync_ops.most_common()),
        "solve_shapes": dict(counts.solve_shapes.most_common(4)),
        "largest": counts.largest,
        "peak_bytes": counts.peak_bytes,
        "seconds": seconds,
    }


def run_shape(name: str, device: torch.device, layers: int, counts: list[int]) -> None:
    if name == "small":
        vocab, batch, length = 8192, 4, 256
        model = tiny_causal_lm(
            "llama", vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=8
        )
        label = "small (Llama d 256, 4 layers, fp32, 4 x 256)"
    else:
        vocab, batch, length = 151_936, 4, 1024
        model = qwen_half_billion(layers)
        label = f"0.5B (Qwen2-0.5B widths, {layers} layers, bf16, 4 x 1024)"
    model.to(device)
    ids = torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    prefix, capture = captured(model, ids)
    print(f"\n{label}, last block Q/K/V/O, captured prefix")
    print(
        f"{'targets':>8} {'ops':>8} {'syncs':>7} {'solves':>7} {'s (counting)':>13} "
        f"{'peak MiB':>9} {'largest Mi el.':>15}  syncs by op"
    )
    try:
        for count in counts:
            row = count_probe(model, ids, prefix, positions(batch, length, count).to(device))
            print(
                f"{count:>8} {row['ops']:>8} {row['syncs']:>7} {row['solves']:>7} "
                f"{row['seconds']:>13.2f} {row['peak_bytes'] / 2**20:>9.1f} "
                f"{row['largest'][0] / 2**20:>15.2f}  {row['sync_ops']}  "
                f"solves {row['solve_shapes']}  largest allocation: {row['largest'][2]}"
            )
    finally:
        capture.remove()


def memory_vs_length(device: torch.device, width: int, lengths: list[int], count: int) -> None:
    """Peak extra memory of one captured last-block probe against T (see the module)."""
    batch = 4
    print(
        f"\nmemory vs T: Llama-3-8B proportions at d {width}, 1 block, bf16, {batch} rows, "
        f"{count} targets, vocab 128,256"
    )
    print(
        f"{'T':>6} {'peak MiB':>9} {'prefix MiB':>11} {'peak/prefix':>12} "
        f"{'largest MiB':>12}  largest allocation"
    )
    for length in lengths:
        model = llama_stand_in(width, length).to(device)
        ids = torch.randint(4, 128_256, (batch, length), generator=torch.Generator().manual_seed(0))
        prefix, capture = captured(model, ids.to(device))
        try:
            row = count_probe(
                model, ids.to(device), prefix, positions(batch, length, count).to(device)
            )
        finally:
            capture.remove()
        prefix_bytes = batch * length * width * 2
        print(
            f"{length:>6} {row['peak_bytes'] / 2**20:>9.1f} {prefix_bytes / 2**20:>11.1f} "
            f"{row['peak_bytes'] / prefix_bytes:>12.1f} {row['largest'][1] / 2**20:>12.1f}  "
            f"{row['largest'][2]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=("small", "0.5b", "both"), default="both")
    parser.add_argument("--layers", type=int, default=24, help="depth of the 0.5B shape")
    parser.add_argument("--targets", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--memory-width", type=int, help="peak memory vs T at this width")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    if args.memory_width:
        memory_vs_length(device, args.memory_width, args.lengths, args.targets[0])
        return
    for shape in ("small", "0.5b") if args.shape == "both" else (args.shape,):
        run_shape(shape, device, args.layers, args.targets)


if __name__ == "__main__":
    main()
