"""CorR-PO in TRL's GRPOTrainer: step-time cost, and a short toy training of both arms.

Usage: python benchmarks/bench_corrpo.py [--time-steps 12] [--rounds 2] [--train-steps 150]

Setup: tiny Llama from ``inversion_monitor.toy`` (CPU), character tokenizer,
arithmetic prompts, 8 completions per step (2 prompts x 4 generations), up to
32 completion tokens, sampling with transformers (no vLLM).

1. Step time: plain ``GRPOTrainer`` vs ``CorrPOGRPOTrainer`` (default probe:
   last block, Q and O), interleaved in rounds; median step time of each and
   the ratio (goal <= 1.2x).
2. Toy training: both arms from the same seed for ``--train-steps`` steps;
   the plain arm is ``CorrPOGRPOTrainer`` with ``coef=0`` (it measures rho
   but does not shape), the CorR-PO arm uses ``coef`` (default 0.1). Prints
   rho (mean over the step's completions) and the task reward, averaged over
   windows of steps, side by side.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from typing import Any

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from inversion_monitor.callbacks.trl_corrpo import CorrPOConfig, CorrPOGRPOTrainer
from inversion_monitor.toy.corpus import arithmetic_problems
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer

try:
    from benchmarks.bench_overhead import StepTimer
except ImportError:  # run as a script from benchmarks/
    from bench_overhead import StepTimer  # type: ignore[no-redef]


def task_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1 for "A: <answer>"; 0.1 for writing any digit; else 0."""
    return [
        1.0 if f"A: {a}" in c else (0.1 if any(ch.isdigit() for ch in c) else 0.0)
        for c, a in zip(completions, answer, strict=True)
    ]


def make_trainer(
    out_dir: str, steps: int, corrpo: CorrPOConfig | None, seed: int, timer: StepTimer | None
) -> GRPOTrainer:
    problems = arithmetic_problems(512, seed=seed)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": str(p.answer)} for p in problems])
    config = GRPOConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=32,
        learning_rate=2e-3,
        logging_steps=1,
        use_vllm=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=seed,
    )
    kwargs: dict[str, Any] = {
        "model": tiny_causal_lm("llama", seed=seed).train(),
        "reward_funcs": task_reward,
        "args": config,
        "train_dataset": dataset,
        "processing_class": char_tokenizer(),
        "callbacks": [timer] if timer is not None else [],
    }
    if corrpo is None:
        return GRPOTrainer(**kwargs)
    return CorrPOGRPOTrainer(corrpo=corrpo, **kwargs)


def step_times(steps: int, rounds: int) -> None:
    times: dict[str, list[float]] = {"plain GRPO": [], "GRPO + CorR-PO": []}
    for round_index in range(rounds):
        for name, values in times.items():
            timer = StepTimer()
            corrpo = None if name == "plain GRPO" else CorrPOConfig(coef=0.1)
            with tempfile.TemporaryDirectory() as out:
                make_trainer(out, steps, corrpo, seed=round_index, timer=timer).train()
            values.extend(timer.times[1:])  # the first interval includes warm-up
    plain = statistics.median(times["plain GRPO"])
    print(f"step time (median of {len(times['plain GRPO'])} steps per arm, CPU):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:16s} {median * 1e3:8.1f} ms   ratio {median / plain:5.3f}")


def train(steps: int, coef: float, seed: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(out, steps, CorrPOConfig(coef=coef), seed=seed, timer=None)
        trainer.train()
    rows = []
    for entry in trainer.state.log_history:
        if "corrpo/rho_mean" in entry:
            rows.append(
                {
                    "step": entry["step"],
                    "rho": entry["corrpo/rho_mean"],
                    "reward": entry["rewards/task_reward/mean"],
                    "length": entry.get("completions/mean_length", math.nan),
                }
            )
    return rows


def _window_mean(rows: list[dict[str, float]], key: str, lo: int, hi: int) -> float:
    values = [r[key] for r in rows if lo < r["step"] <= hi and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def comparison(steps: int, coef: float, seed: int, window: int) -> None:
    plain = train(steps, 0.0, seed)
    shaped = train(steps, coef, seed)
    print(f"\ntoy training, {steps} steps, seed {seed}, lambda {coef} (window means):")
    print(
        "  steps      | rho plain  rho CorR-PO | reward plain  reward CorR-PO | len plain  len CorR"
    )
    for lo in range(0, steps, window):
        hi = min(lo + window, steps)
        print(
            f"  {lo + 1:4d}-{hi:<5d} | {_window_mean(plain, 'rho', lo, hi):9.3f}  "
            f"{_window_mean(shaped, 'rho', lo, hi):11.3f} | "
            f"{_window_mean(plain, 'reward', lo, hi):12.3f}  "
            f"{_window_mean(shaped, 'reward', lo, hi):14.3f} | "
            f"{_window_mean(plain, 'length', lo, hi):9.1f}  "
            f"{_window_mean(shaped, 'length', lo, hi):8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--coef", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=25)
    ns = parser.parse_args()
    if ns.time_steps > 0:
        step_times(ns.time_steps, ns.rounds)
    if ns.train_steps > 0:
        comparison(ns.train_steps, ns.coef, ns.seed, ns.window)


if __name__ == "__main__":
    main()
