"""Small real Lightning runs shared by the Lightning callback tests.

Run as a script (``python -m tests.lightning_runs OUT_DIR``) it trains with
``strategy="ddp"`` on two CPU processes (gloo); Lightning re-launches this same
command for rank 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from inversion_monitor.toy.data import causal_lm_collator, tokenized_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer


class TinyCausalLM(pl.LightningModule):
    """A LightningModule holding a tiny Hugging Face causal LM in ``self.model``."""

    def __init__(self, arch: str = "llama", seed: int = 0, lr: float = 2e-3) -> None:
        super().__init__()
        self.model = tiny_causal_lm(arch, seed=seed).train()  # type: ignore[arg-type]
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def train_loader(batches: int, *, batch_size: int = 4, seed: int = 0) -> DataLoader[Any]:
    tokenizer = char_tokenizer()
    collate = causal_lm_collator(tokenizer)
    rows = tokenized_corpus(tokenizer, batches * batch_size, seed=seed, max_length=64)
    return DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda items: dict(collate(items)),
    )


def trainer(
    tmp_path: Path | None,
    *,
    callbacks: list[Any] | None = None,
    max_steps: int = 12,
    **kwargs: Any,
) -> pl.Trainer:
    """A CPU Trainer without progress bar or checkpointing; CSVLogger when ``tmp_path``."""
    logger: Any = False
    if tmp_path is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(str(tmp_path), name="logs")
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": logger,
        "callbacks": callbacks or [],
        **kwargs,
    }
    return pl.Trainer(**options)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _ddp_main(out_dir: Path) -> None:
    """Two gloo ranks, budget schedule (the ranks agree each step), JSONL per rank."""
    from inversion_monitor.callbacks import InversionLightningCallback

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    # rank 1 (launched with LOCAL_RANK=1) probes far more tokens and layers, so its probes
    # cost more: left alone, the two budget schedules would pick different steps
    slow = os.environ.get("LOCAL_RANK", "0") == "1"
    callback = InversionLightningCallback(
        jsonl_path=str(out_dir / "records.jsonl"),
        overhead_budget=0.5,
        tokens_per_probe=128 if slow else 16,
        layers=[0, -1] if slow else [-1],
    )
    run = trainer(
        None,
        callbacks=[callback],
        max_steps=6,
        devices=2,
        strategy="ddp",
        use_distributed_sampler=True,
    )
    run.fit(TinyCausalLM(), train_loader(12))
    if run.global_rank == 0:
        (out_dir / "done").write_text(str(run.global_step))


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
