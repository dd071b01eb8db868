"""A failure corpus: real toy training runs, healthy and with injected faults, step by step.

    .venv/bin/python benchmarks/failure_corpus.py [--out build/failure_corpus.json] [--quick]
        [--jobs 2]

Every run records, per optimizer step, what the trainer itself computed (no extra
forward): SFT runs through the Hugging Face ``Trainer`` (``logging_steps=1``, read
from ``trainer.state.log_history``: loss, grad_norm before clipping, learning
rate); RL runs through the demo's GRPO loop (:mod:`inversion_monitor.app.demo_rl`:
loss, grad norm, reward mean and std, the policy's entropy over completion
tokens of the distribution they were sampled from (logits / temperature, as TRL
logs it; ``policy_entropy_unscaled``: at temperature 1), Cui et al.'s entropy
covariance, KL to the starting policy, mean completion length) with the monitor's
probe in-process on every step (rho and token entropy: the inversion's lead or
lag); TRL runs through its ``GRPOTrainer`` (its own logged reward, KL, entropy,
completion length, loss and grad norm, one log per step). Faults (``onset`` = the
first step that has it):

- SFT: ``lr_jump`` (learning rate x20), ``nan_batch`` (one batch's loss is NaN:
  NaN gradients poison AdamW), ``label_corruption`` (labels become random tokens);
- RL (from one SFT base model): ``lr_jump`` (x300, the demo's fault),
  ``zero_reward`` (the reward function returns 0), ``length_hack`` (the reward
  pays for length: reward hacking), ``entropy_collapse`` (no KL, samples at
  temperature 0.3, the group baseline lost: the policy trains on its own
  sharpened samples);
- TRL GRPO: ``zero_reward`` (the reward function returns 0), ``lr_jump`` (x100 through
  the trainer's scheduler), ``nan_batch`` (one step's loss is NaN).

Healthy runs: 15 SFT seeds (5 of 300 steps, 10 of 800), 77 of the GRPO loop (7 of 60
steps, 60 of 120, 10 of 240) and 10 of TRL (2 of 40, 8 of 80): with the fault runs'
records before their onsets, 20,840 healthy steps, 10,893 of them RL (the false-alarm
rate needs 10,000). Runs are cached in a JSON file, run by run under their names (112
runs, 21,155 steps); a run added to the plan is trained alone, and an interrupted
build keeps the runs it finished (faults come before the long healthy RL seeds). At
load 5-8 on 2 cores one process trained 44 RL runs (4,880 steps) in ~35 minutes: the
full plan takes over an hour with ``--jobs 2`` there. :mod:`bench_detection` reads it
(``--corpus``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "build" / "failure_corpus.json"
VERSION = 2
FIELDS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "reward_mean",
    "reward_std",
    "policy_entropy_mean",
    "policy_entropy_unscaled",
    "entropy_covariance",
    "kl",
    "completion_length_mean",
    "rho",
    "n",
    "entropy_mean",
)


@dataclass
class CorpusRun:
    """One run: its family (``sft``/``rl``), fault (None: healthy), onset step and records."""

    name: str
    family: str
    fault: str | None
    onset: int | None
    seed: int
    records: list[dict[str, float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class CorpusPlan:
    """How long and how many: the full corpus, or a quick slice for the test."""

    sft_steps: int = 300
    sft_fault_steps: int = 200
    sft_onset: int = 150
    sft_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # more healthy seeds, longer: the false-alarm rate needs >= 10,000 healthy steps
    sft_long_steps: int = 800
    sft_long_seeds: tuple[int, ...] = tuple(range(5, 15))
    base_steps: int = 300
    rl_steps: int = 60
    rl_onset: int = 25
    rl_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    rl_long_steps: int = 120
    rl_long_seeds: tuple[int, ...] = tuple(range(7, 67))
    # and longer still: a healthy run's slow drift over hundreds of steps
    rl_longer_steps: int = 240
    rl_longer_seeds: tuple[int, ...] = tuple(range(67, 77))
    sft_faults: tuple[str, ...] = ("lr_jump", "nan_batch", "label_corruption")
    rl_faults: tuple[str, ...] = ("lr_jump", "zero_reward", "length_hack", "entropy_collapse")
    trl_steps: int = 40
    trl_onset: int = 20
    trl_seeds: tuple[int, ...] = (0, 1)
    trl_long_steps: int = 80
    trl_long_seeds: tuple[int, ...] = tuple(range(2, 10))
    trl_faults: tuple[str, ...] = ("zero_reward", "lr_jump", "nan_batch")


QUICK = CorpusPlan(
    sft_steps=40,
    sft_fault_steps=40,
    sft_onset=25,
    sft_seeds=(0,),
    sft_long_seeds=(),
    base_steps=40,
    rl_steps=0,
    trl_steps=0,
    sft_faults=("nan_batch",),
    rl_faults=(),
)

SFT_LR = 2e-3
SFT_BATCH = 16
TRL_LR_JUMP = 100.0


def sft_run(steps: int, seed: int, fault: str | None, onset: int) -> tuple[CorpusRun, Any]:
    """An HF ``Trainer`` run on the toy corpus; returns the run and the trained model."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
    from inversion_monitor.toy.models import tiny_causal_lm
    from inversion_monitor.toy.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", seed=seed).train()
    corrupt = torch.Generator().manual_seed(seed + 1000)

    class FaultyTrainer(Trainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            step = int(self.state.global_step) + 1  # the step this loss is for
            if fault == "label_corruption" and step >= onset:
                labels = inputs["labels"]
                noise = torch.randint(3, 40, labels.shape, generator=corrupt)
                inputs = {**inputs, "labels": torch.where(labels >= 0, noise, labels)}
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if fault == "nan_batch" and step == onset:
                loss = loss * float("nan")
            return loss

    args = TrainingArguments(
        output_dir="/tmp/inversion-monitor-corpus",
        max_steps=steps,
        per_device_train_batch_size=SFT_BATCH,
        learning_rate=SFT_LR,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR)

    def factor(done: int) -> float:  # LambdaLR: ``done`` optimizer steps so far
        warm = min(1.0, (done + 1) / 10)
        return warm * (20.0 if fault == "lr_jump" and done + 1 >= onset else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    trainer = FaultyTrainer(
        model=model,
        args=args,
        train_dataset=tokenized_corpus(tokenizer, SFT_BATCH * steps, seed=seed, max_length=96),
        data_collator=causal_lm_collator(tokenizer),
        optimizers=(optimizer, scheduler),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    run = CorpusRun(
        f"sft-{fault or 'healthy'}-s{seed}", "sft", fault, onset if fault else None, seed
    )
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            run.records.append(
                {
                    "step": float(entry["step"]),
                    "loss": float(entry["loss"]),
                    "grad_norm": float(entry.get("grad_norm", math.nan)),
                    "learning_rate": float(entry.get("learning_rate", math.nan)),
                }
            )
    return run, trainer.model


def rl_run(base: Any, steps: int, seed: int, fault: str | None, onset: int) -> CorpusRun:
    """The demo's GRPO loop from ``base``'s weights, probed every step."""
    import copy

    from inversion_monitor.app.demo_rl import GRPOSettings, train_grpo
    from inversion_monitor.config import MonitorConfig
    from inversion_monitor.engine.training_monitor import InversionMonitor
    from inversion_monitor.toy.tokenizer import char_tokenizer

    model = copy.deepcopy(base).train()
    settings = GRPOSettings(
        steps=steps,
        lr=1e-3,
        prompts=4,
        group=4,
        max_new_tokens=64,
        seed=seed,
        kl_coef=0.05,
        max_grad_norm=1.0,
        lr_jump=(onset, 300.0) if fault == "lr_jump" else None,
        reward_fault=(onset, "zero")
        if fault == "zero_reward"
        else (onset, "length")
        if fault == "length_hack"
        else None,
        collapse_at=onset if fault == "entropy_collapse" else None,
    )
    monitor = InversionMonitor(
        MonitorConfig(
            endpoint=None,
            every_n_steps=1,
            tokens_per_probe=128,
            sequences_per_probe=8,
            projections=["q", "o"],
            kind="rl",
            seed=seed,
        ),
        framework="custom",
    )
    run = CorpusRun(f"rl-{fault or 'healthy'}-s{seed}", "rl", fault, onset if fault else None, seed)

    def on_step(step: int, values: dict[str, float]) -> None:
        stats = monitor.last_stats if monitor.probes else None
        run.records.append(
            {
                "step": float(step),
                "loss": values["loss"],
                "grad_norm": values["grad_norm"],
                "learning_rate": values["lr"],
                "reward_mean": values["reward"],
                "reward_std": values["reward_std"],
                "policy_entropy_mean": values["entropy"],
                "policy_entropy_unscaled": values["entropy_unscaled"],
                "entropy_covariance": values["covariance"],
                "kl": values["kl"],
                "completion_length_mean": values["completion_length"],
                "rho": stats.rho if stats is not None else None,
                "n": float(stats.n) if stats is not None else None,
                "entropy_mean": stats.entropy_mean if stats is not None else None,
            }
        )

    try:
        train_grpo(model, char_tokenizer(), monitor, settings, on_step=on_step)
    except RuntimeError:  # sampling from a diverged policy's NaN logits: the run stops there
        if fault != "lr_jump":
            raise
    finally:
        monitor.close()
    return run


@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: what to train (its ``name`` is its key in the cache)."""

    name: str
    family: str
    fault: str | None
    seed: int
    steps: int
    onset: int


def specs(plan: CorpusPlan) -> list[RunSpec]:
    """The runs of ``plan``, in order: healthy SFT seeds, SFT faults, long healthy SFT seeds,
    the short healthy RL seeds, RL faults, TRL's (short healthy seeds, faults, long healthy
    seeds), the long healthy RL seeds (faults on seed 0, before the long healthy seeds: an
    interrupted build has them; RL runs start from the first SFT seed's trained model)."""
    out = [
        RunSpec(f"sft-healthy-s{seed}", "sft", None, seed, plan.sft_steps, plan.sft_onset)
        for seed in plan.sft_seeds
    ]
    out += [
        RunSpec(f"sft-{fault}-s0", "sft", fault, 0, plan.sft_fault_steps, plan.sft_onset)
        for fault in plan.sft_faults
    ]
    out += [
        RunSpec(f"sft-healthy-s{seed}", "sft", None, seed, plan.sft_long_steps, plan.sft_onset)
        for seed in plan.sft_long_seeds
    ]
    if plan.rl_steps:
        out += [
            RunSpec(f"rl-healthy-s{seed}", "rl", None, seed, plan.rl_steps, plan.rl_onset)
            for seed in plan.rl_seeds
        ]
        out += [
            RunSpec(f"rl-{fault}-s0", "rl", fault, 0, plan.rl_steps, plan.rl_onset)
            for fault in plan.rl_faults
        ]
    if plan.trl_steps:
        out += [
            RunSpec(f"trl-healthy-s{seed}", "trl", None, seed, plan.trl_steps, plan.trl_onset)
            for seed in plan.trl_seeds
        ]
        out += [
            RunSpec(f"trl-{fault}-s0", "trl", fault, 0, plan.trl_steps, plan.trl_onset)
            for fault in plan.trl_faults
        ]
        out += [
            RunSpec(f"trl-healthy-s{seed}", "trl", None, seed, plan.trl_long_steps, plan.trl_onset)
            for seed in plan.trl_long_seeds
        ]
    if plan.rl_steps:
        out += [
            RunSpec(f"rl-healthy-s{seed}", "rl", None, seed, plan.rl_long_steps, plan.rl_onset)
            for seed in plan.rl_long_seeds
        ]
        out += [
            RunSpec(f"rl-healthy-s{seed}", "rl", None, seed, plan.rl_longer_steps, plan.rl_onset)
            for seed in plan.rl_longer_seeds
        ]
    return out


def trl_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1 for the right answer, else a small length-based reward (so advantages vary)."""
    return [1.0 if a in c else len(c) / 64 for c, a in zip(completions, answer, strict=True)]


def trl_grpo_run(base: Any, steps: int, seed: int, fault: str | None, onset: int) -> CorpusRun:
    """TRL's ``GRPOTrainer`` from ``base``'s weights (KL to them, beta 0.05), one log per
    step (reward, its std, KL, the policy's entropy, mean completion length, loss, grad norm,
    learning rate: TRL's own numbers). Faults from step ``onset``: ``zero_reward`` (the
    reward function returns 0), ``lr_jump`` (the learning rate x``TRL_LR_JUMP`` through the
    trainer's own scheduler), ``nan_batch`` (that step's loss is NaN: NaN gradients poison
    AdamW, and the next generation samples from NaN logits and stops the run, as it would)."""
    import copy
    import tempfile

    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from inversion_monitor.toy.corpus import arithmetic_problems
    from inversion_monitor.toy.tokenizer import char_tokenizer

    def reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        state = kwargs.get("trainer_state")
        step = int(state.global_step) + 1 if state is not None else 0  # the step it is for
        if fault == "zero_reward" and step >= onset:
            return [0.0] * len(completions)
        return trl_reward(completions, answer)

    problems = arithmetic_problems(8 * steps, seed=seed)
    data = Dataset.from_list([{"prompt": p.prompt, "answer": str(p.answer)} for p in problems])
    with tempfile.TemporaryDirectory() as tmp:
        policy = copy.deepcopy(base).train()
        policy.save_pretrained(f"{tmp}/policy")  # TRL loads the reference model from here
        policy.config._name_or_path = f"{tmp}/policy"
        config = GRPOConfig(
            output_dir=f"{tmp}/out",
            max_steps=steps,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=24,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            beta=0.05,
            logging_steps=1,
            use_vllm=False,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            bf16=False,
            dataloader_num_workers=0,
            seed=seed,
            log_level="error",
        )

        class FaultyGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
            def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                loss = super().compute_loss(model, inputs, *args, **kwargs)
                if fault == "nan_batch" and int(self.state.global_step) + 1 == onset:
                    loss = loss * float("nan")
                return loss

        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate)

        def factor(done: int) -> float:  # LambdaLR: ``done`` optimizer steps so far
            return TRL_LR_JUMP if fault == "lr_jump" and done + 1 >= onset else 1.0

        trainer = FaultyGRPOTrainer(
            model=policy,
            reward_funcs=reward,
            args=config,
            train_dataset=data,
            processing_class=char_tokenizer(),
            optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)),
        )
        trainer.remove_callback(PrinterCallback)
        try:
            trainer.train()
        except RuntimeError:  # sampling from NaN weights: the run stops, its log stays
            if fault != "nan_batch":
                raise
    run = CorpusRun(
        f"trl-{fault or 'healthy'}-s{seed}", "trl", fault, onset if fault else None, seed
    )
    for e in trainer.state.log_history:
        if "reward" not in e or "step" not in e:
            continue
        run.records.append(
            {
                "step": float(e["step"]),
                "loss": float(e.get("loss", math.nan)),
                "grad_norm": float(e.get("grad_norm", math.nan)),
                "learning_rate": float(e.get("learning_rate", math.nan)),
                "reward_mean": float(e["reward"]),
                "reward_std": float(e.get("reward_std", math.nan)),
                "policy_entropy_mean": float(e.get("entropy", math.nan)),
                "kl": float(e.get("kl", math.nan)),
                "completion_length_mean": float(e.get("completions/mean_length", math.nan)),
            }
        )
    return run


def build(
    plan: CorpusPlan,
    say: Any = print,
    cached: dict[str, CorpusRun] | None = None,
    keep: Any = None,
    only: set[str] | None = None,
) -> list[CorpusRun]:
    """Train every run of ``plan`` not in ``cached`` (single-threaded torch; seconds per run;
    ``only``: of these names), calling ``keep(runs)`` after each new one (the cache grows run
    by run: an interrupted build loses at most the run under way)."""
    import torch

    torch.set_num_threads(1)
    cached = cached or {}
    runs: list[CorpusRun] = []
    started = time.monotonic()
    base = None
    base_seed = plan.sft_seeds[0]
    for spec in specs(plan):
        if spec.name in cached:
            runs.append(cached[spec.name])
            continue
        if only is not None and spec.name not in only:
            continue
        if spec.family == "sft":
            run, model = sft_run(spec.steps, spec.seed, spec.fault, spec.onset)
            if spec.fault is None and spec.seed == base_seed:
                base = model
        else:
            if base is None:  # the RL base model: the first SFT seed's run, trained again
                _, base = sft_run(plan.sft_steps, base_seed, None, plan.sft_onset)
            make = rl_run if spec.family == "rl" else trl_grpo_run
            run = make(base, spec.steps, spec.seed, spec.fault, spec.onset)
        runs.append(run)
        if keep is not None:
            keep([*runs, *(r for n, r in cached.items() if n not in {x.name for x in runs})])
        say(f"  {run.name}: {len(run.records)} steps ({time.monotonic() - started:.0f} s)")
    return runs


def save(runs: list[CorpusRun], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": VERSION, "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(body, allow_nan=True))


def load(path: Path) -> list[CorpusRun] | None:
    """The cached corpus, or None if absent or of another version."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if body.get("version") != VERSION:
        return None
    return [CorpusRun(**r) for r in body["runs"]]


def corpus(
    path: Path = DEFAULT_PATH,
    *,
    rebuild: bool = False,
    say: Any = print,
    jobs: int = 1,
    plan: CorpusPlan | None = None,
) -> list[CorpusRun]:
    """The corpus of ``plan`` (the full one by default), in its order: cached runs reused by
    name, missing ones trained (and cached as each finishes; ``jobs`` > 1: in that many
    processes, each into a part file, merged at the end: the same runs as one process)."""
    cached = {} if rebuild else {r.name: r for r in load(path) or []}
    plan = plan or CorpusPlan()
    missing = [s.name for s in specs(plan) if s.name not in cached]
    if missing:
        say(f"training {len(missing)} runs of the failure corpus into {path}: {', '.join(missing)}")
    if missing and jobs > 1:
        cached.update(build_in_parts(path, cached, min(jobs, len(missing)), plan, say))
        save(list(cached.values()), path)
    return build(plan, say, cached, keep=lambda runs: save(runs, path))


def part_path(path: Path, part: int) -> Path:
    return path.with_name(f"{path.stem}.part{part}{path.suffix}")


def build_in_parts(
    path: Path, cached: dict[str, CorpusRun], jobs: int, plan: CorpusPlan, say: Any = print
) -> dict[str, CorpusRun]:
    """Train the runs missing from ``cached`` in ``jobs`` processes (missing run i in part
    i mod jobs; each process caches its runs in its own part file); the runs they made."""
    import subprocess
    import sys

    save(list(cached.values()), path)  # the parts skip what is cached
    started = time.monotonic()
    script = [sys.executable, __file__, "--out", str(path), "--plan", json.dumps(asdict(plan))]
    procs = [
        subprocess.Popen([*script, "--part", f"{i}/{jobs}"], stdout=subprocess.DEVNULL)
        for i in range(jobs)
    ]
    codes = [p.wait() for p in procs]
    made: dict[str, CorpusRun] = {}
    for i in range(jobs):
        made.update({r.name: r for r in load(part_path(path, i)) or []})
        part_path(path, i).unlink(missing_ok=True)
    took = time.monotonic() - started
    say(f"  {len(made)} runs in {jobs} processes ({took:.0f} s, exit codes {codes})")
    return made


def build_part(path: Path, part: int, parts: int, plan: CorpusPlan, say: Any = print) -> None:
    """One process of :func:`build_in_parts`: its share of the runs missing from ``path``."""
    cached = {r.name: r for r in load(path) or []}
    mine = {s.name for s in specs(plan) if s.name not in cached}
    mine = {n for k, n in enumerate(sorted(mine)) if k % parts == part}
    out = part_path(path, part)
    done = {r.name: r for r in load(out) or []}  # an interrupted part resumes
    build(
        plan,
        say,
        {**cached, **done},
        keep=lambda runs: save([r for r in runs if r.name in mine], out),
        only=mine,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--quick", action="store_true", help="the test's small slice only")
    parser.add_argument("--jobs", type=int, default=1, help="train in this many processes")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # i/n: one process
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)  # its plan, as JSON
    args = parser.parse_args()
    if args.part is not None:
        part, parts = (int(x) for x in args.part.split("/"))
        fields = json.loads(args.plan) if args.plan else {}
        plan = CorpusPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        build_part(args.out, part, parts, plan)
        return
    started = time.monotonic()
    if args.quick:
        runs = build(QUICK)
        save(runs, args.out)
    else:
        runs = corpus(args.out, jobs=args.jobs)
    print(
        f"{len(runs)} runs, {sum(len(r.records) for r in runs)} steps -> {args.out}"
        f" ({time.monotonic() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
