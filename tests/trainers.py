"""Small real training runs shared by the callback tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer


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
