"""Small real training runs shared by the callback tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainingArguments

from inversion_monitor.toy.corpus import arithmetic_problems
from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import GRPOConfig

# TrainingArguments of every tiny CPU run: no reports, checkpoints, bars, bf16 or workers
CPU_ARGS: dict[str, Any] = {
    "report_to": [],
    "use_cpu": True,
    "save_strategy": "no",
    "disable_tqdm": True,
    "bf16": False,
    "dataloader_num_workers": 0,
    "seed": 0,
}


def arithmetic_dataset(n: int, seed: int) -> Dataset:
    """``n`` arithmetic prompts with their ``answer`` column (for GRPO's reward functions)."""
    from datasets import Dataset

    problems = arithmetic_problems(n, seed=seed)
    return Dataset.from_list([{"prompt": p.prompt, "answer": str(p.answer)} for p in problems])


def grpo_config(output_dir: Path, max_steps: int, **overrides: Any) -> GRPOConfig:
    """The tiny GRPO run's config: 4 prompts per device, 2 completions of <= 12 tokens each,
    lr 1e-3, a log every step, no vLLM, :data:`CPU_ARGS`; ``overrides`` change any of it."""
    from trl import GRPOConfig

    args: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 12,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "use_vllm": False,
        **CPU_ARGS,
        **overrides,
    }
    return GRPOConfig(output_dir=str(output_dir), max_steps=max_steps, **args)


def hf_trainer(
    tmp_path: Path,
    *,
    arch: str = "llama",
    callbacks: list[Any] | None = None,
    max_steps: int = 30,
    grad_accum: int = 1,
    seed: int = 0,
    logging_steps: int = 10,
    **args: Any,
) -> Trainer:
    """A real HF Trainer on a tiny model and the arithmetic corpus (CPU, no downloads)."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(arch, seed=seed)  # type: ignore[arg-type]
    model.train()
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        learning_rate=2e-3,
        logging_steps=logging_steps,
        report_to=[],
        save_strategy="no",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **args,
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized_corpus(tokenizer, 4 * max_steps * grad_accum, seed=seed),
        data_collator=causal_lm_collator(tokenizer),
        callbacks=callbacks,
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
