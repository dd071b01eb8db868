"""The probe's general path (deep layers): batched VJPs vs one row per target, side by side.

Usage: python benchmarks/bench_general_path.py [--rounds 3] [--device cpu|cuda]
       [--layers 0,-1 1,-1] [--projections qkvo]

Issue 15's bench shape (Llama hidden 256, 4 layers, 8 heads, vocab 8192;
probe 4 x 256, 64 targets; one training step = forward, backward and AdamW
on 8 x 256). For each layer set it times, in interleaved rounds (minimum;
the machine may be shared), the training step, the general path as it was
(one row per target: ``_chunks`` + ``_probe_rows``, norms from a QR of both
factors), one row per target with one input QR per sequence (what sharded
models run now) and the batched path (:mod:`inversion_monitor.probe.rows`), and
prints both in training steps with the max relative error of each against
the brute-force reference. Also prints the lower bound of the backward: the
sum over targets of t + 1 token-backwards, in the units of the per-row path.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

# run as a script, the benchmarks folder is on sys.path: one timing and error helper for both
from bench_probe import interleaved_minimum, max_relative_error

import inversion_monitor.probe.gradients as probe_module
import inversion_monitor.probe.rows as rows_module
from inversion_monitor.metrics.norms import outer_sum_norm
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.reference import reference_norms
from inversion_monitor.toy.models import tiny_causal_lm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_row_general(plan: Any, chunk_tokens: int) -> None:
    """The general path before the batched one (f8f702f): one row per target, and each
    row's norm from a QR of both of its factors (``outer_sum_norm``)."""
    max_rows = max(1, probe_module._LOGIT_ELEMENTS // probe_module._vocab_size(plan.resolved))
    original = rows_module.per_row_norms
    rows_module.per_row_norms = lambda gamma, x, sequences, support, norm: outer_sum_norm(
        gamma, x, norm
    )
    try:
        for group in probe_module._chunks(plan.targets[:, 1] + 1, chunk_tokens, max_rows):
            probe_module._probe_rows(plan, group.to(plan.input_ids.device))
    finally:
        rows_module.per_row_norms = original


def per_row_shared_qr(plan: Any, chunk_tokens: int) -> None:
    """One row per target with one input QR per sequence (what sharded models run)."""
    max_rows = max(1, probe_module._LOGIT_ELEMENTS // probe_module._vocab_size(plan.resolved))
    for group in probe_module._chunks(plan.targets[:, 1] + 1, chunk_tokens, max_rows):
        probe_module._probe_rows(plan, group.to(plan.input_ids.device))


def with_general(variant: Callable[[Any, int], None], fn: Callable[[], ProbeResult]) -> ProbeResult:
    original = probe_module._probe_general
    probe_module._probe_general = variant
    try:
        return fn()
    finally:
        probe_module._probe_general = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", nargs="+", default=["0,-1", "1,-1"])
    parser.add_argument("--projections", default="qkvo")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    vocab = 8192
    shape = {"vocab_size": vocab, "hidden_size": 256, "num_layers": 4, "num_heads": 8}
    model = tiny_causal_lm("llama", **shape).to(device)  # type: ignore[arg-type]
    trained = tiny_causal_lm("llama", **shape).to(device).train()  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    train_ids = torch.randint(4, vocab, (8, 256), generator=gen).to(device)
    ids = torch.randint(4, vocab, (4, 256), generator=gen).to(device)
    flat = torch.randperm(4 * 255, generator=torch.Generator().manual_seed(0))[:64]
    positions = torch.stack([flat // 255, flat % 255], dim=1).to(device)
    projections = tuple(args.projections)

    def step() -> None:
        trained(input_ids=train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    for spec in args.layers:
        layers = [int(v) for v in spec.split(",")]

        def probe(layers: list[int] = layers) -> ProbeResult:
            result = logit_gradient_norms(
                model, ids, positions=positions, layers=layers, projections=projections
            )
            _sync(device)
            return result

        fns: dict[str, Callable[[], Any]] = {
            "step": step,
            "per_row": lambda probe=probe: with_general(per_row_general, probe),
            "per_row_shared_qr": lambda probe=probe: with_general(per_row_shared_qr, probe),
            "batched": probe,
        }
        best = interleaved_minimum(fns, args.rounds)
        row: dict[str, Any] = {
            "layers": layers,
            "projections": "".join(projections),
            "step_ms": round(best["step"] * 1e3, 1),
            "per_row_ms": round(best["per_row"] * 1e3, 1),
            "batched_ms": round(best["batched"] * 1e3, 1),
            "per_row_steps": round(best["per_row"] / best["step"], 2),
            "per_row_shared_qr_ms": round(best["per_row_shared_qr"] * 1e3, 1),
            "batched_steps": round(best["batched"] / best["step"], 2),
            "speedup": round(best["per_row"] / best["batched"], 2),
            "sum_t_plus_1": int((positions[:, 1] + 1).sum()),
        }
        if not args.skip_reference:
            ref = reference_norms(
                model, ids, positions=positions, layers=layers, projections=projections
            )
            row["per_row_max_rel_err"] = max_relative_error(
                with_general(per_row_general, probe), ref
            )
            row["per_row_shared_qr_max_rel_err"] = max_relative_error(
                with_general(per_row_shared_qr, probe), ref
            )
            row["batched_max_rel_err"] = max_relative_error(probe(), ref)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
