"""Per-step cost of the health record in a tiny HF Trainer run, side by side with no monitor.

Usage: python -m benchmarks.bench_health [--steps 60] [--rounds 3]

A tiny Llama (the tests' shape: ``tiny_causal_lm("llama")``), batch 4 of the
arithmetic corpus, CPU. The callback never probes (``every_n_steps`` huge):
what is left is the record every optimizer step sends (the trainer's loss,
grad norm and learning rate, read by ``TrainerHealthTap``). Variants run
interleaved in rounds (drift of a loaded machine hits all alike):

- plain:        no callback;
- health jsonl: one JSONL line per step;
- health gRPC:  sent to a live ``inversion-monitor serve`` on loopback (and JSONL).

Prints each variant's mean step time, its ratio to plain and the difference in
milliseconds, and the time spent inside the monitor's own hooks per step
(``on_optimizer_step`` + ``on_step_end``, measured directly: robust to noise
that swamps a sub-millisecond difference of step times).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from inversion_monitor.callbacks import InversionTrainerCallback
from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer

try:
    from benchmarks.bench_client import _serve
    from benchmarks.bench_overhead import StepTimer
except ImportError:  # run as a script from benchmarks/
    from bench_client import _serve  # type: ignore[no-redef]
    from bench_overhead import StepTimer  # type: ignore[no-redef]


class TimedCallback(InversionTrainerCallback):
    """The monitor's callback, timing its per-step hooks."""

    hook_s: list[float]

    def on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_optimizer_step(*args, **kwargs)
        self._hook = time.perf_counter() - start

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_step_end(*args, **kwargs)
        self.hook_s.append(getattr(self, "_hook", 0.0) + time.perf_counter() - start)


def train(variant: str, steps: int, seed: int, endpoint: str) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps; the step times and the monitor's hook time per step."""
    tokenizer = char_tokenizer()
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    monitor = None
    with tempfile.TemporaryDirectory() as out:
        if variant != "plain":
            options: dict[str, Any] = {"every_n_steps": 10**9, "jsonl_path": f"{out}/r.jsonl"}
            if variant == "health gRPC":
                options |= {"endpoint": endpoint, "run_name": f"bench-{seed}"}
            monitor = TimedCallback(**options)
            monitor.hook_s = []
            callbacks.append(monitor)
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=2e-3,
            logging_steps=10_000,
            report_to=[],
            save_strategy="no",
            seed=seed,
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        Trainer(
            model=tiny_causal_lm("llama", seed=seed).train(),
            args=args,
            train_dataset=tokenized_corpus(tokenizer, 4 * steps, seed=seed),
            data_collator=causal_lm_collator(tokenizer),
            callbacks=callbacks,
        ).train()
    return timer.times, (monitor.hook_s if monitor is not None else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = ["plain", "health jsonl", "health gRPC"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    hooks: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp, _serve(Path(tmp) / "health.db") as endpoint:
        for r in range(args.rounds):
            for variant in variants:
                step_times, hook_times = train(variant, args.steps, r, endpoint)
                times[variant].extend(step_times)
                hooks[variant].extend(hook_times)
                median_ms = statistics.median(step_times) * 1e3
                print(f"  round {r + 1}: {variant:<13} median step {median_ms:.1f} ms")
    base = statistics.mean(times["plain"])
    print(
        f"\n{'variant':<14} {'mean step ms':>13} {'ratio':>7} {'+ms/step':>9} {'hooks ms/step':>14}"
    )
    for variant in variants:
        mean = statistics.mean(times[variant])
        hook = f"{statistics.median(hooks[variant]) * 1e3:.3f}" if hooks[variant] else "-"
        print(
            f"{variant:<14} {mean * 1e3:>13.2f} {mean / base:>6.3f}x "
            f"{(mean - base) * 1e3:>+9.2f} {hook:>14}"
        )
    print("hooks ms/step: median time inside the monitor's on_optimizer_step + on_step_end")


if __name__ == "__main__":
    main()
