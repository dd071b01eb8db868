"""A small GRPO-style loop in PyTorch Lightning with CorR-PO, on toy arithmetic.

Each training step takes a batch of prompts ("Q: 3+4*2=?"), samples
``group_size`` completions per prompt from the policy, scores them with a
verifiable reward (the right answer appears in the completion), and then uses
the CorR-PO building blocks of ``inversion_monitor``:

1. ``sequence_inversion``: rho of each completion (one extra forward and
   backward of the policy for the whole batch);
2. ``corrpo_rewards``: ``r - coef * rho``, gated on the task reward;
3. ``group_advantages``: GRPO's per-group normalisation of the shaped rewards.

The loss is the on-policy GRPO surrogate (one update per batch, so the ratio is
1 and there is no clipping to do): ``-mean(advantage * log p(token))`` over the
completion tokens. ``InversionLightningCallback`` watches the training
forwards; the labels mark the completion tokens, so it probes those only. The
step also returns its RL signals (reward, the policy's entropy and Cui et al.'s
covariance, from the loss's own log-probs: no extra forward) as ``rl_stats``,
so the monitor's records carry them (run kind ``rl``).

Run it::

    python -m inversion_monitor.app.examples.lightning_grpo_corrpo --steps 20 --coef 0.1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from inversion_monitor import corrpo_rewards, group_advantages, sequence_inversion
from inversion_monitor.callbacks import InversionLightningCallback
from inversion_monitor.rl.signals import RLStepAccumulator
from inversion_monitor.toy.corpus import arithmetic_problems
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer

PAD, EOS = 0, 2


def task_reward(completion: str, answer: int) -> float:
    """1 for the right answer after "A:"; 0.1 for at least writing a number; else 0."""
    if f"A: {answer}" in completion:
        return 1.0
    return 0.1 if any(c.isdigit() for c in completion) else 0.0


class GRPOCorrPO(pl.LightningModule):  # type: ignore[misc]
    """A policy (tiny Hugging Face causal LM in ``self.model``) trained with GRPO + CorR-PO."""

    def __init__(
        self,
        *,
        coef: float = 0.1,
        gate_threshold: float | None = None,
        group_size: int = 4,
        max_new_tokens: int = 24,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = tiny_causal_lm("llama", seed=seed).train()
        self.tokenizer = char_tokenizer()
        self.coef, self.gate_threshold = coef, gate_threshold
        self.group_size, self.max_new_tokens, self.lr = group_size, max_new_tokens, lr
        self.history: list[dict[str, float]] = []

    def rollout(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``group_size`` samples per prompt: ids, attention and completion masks."""
        encoded = self.tokenizer(
            [p for p in prompts for _ in range(self.group_size)],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        prompt_ids = encoded["input_ids"].to(self.device)
        prompt_mask = encoded["attention_mask"].to(self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )
        completion_ids = out[:, prompt_ids.shape[1] :]
        # keep each completion up to and including its first EOS
        is_eos = completion_ids == EOS
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        completion_mask = (~after_eos).long()
        completion_ids = completion_ids.masked_fill(after_eos, PAD)
        return {
            "input_ids": torch.cat([prompt_ids, completion_ids], 1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
            "completion_mask": torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        rollout = self.rollout(batch["prompt"])
        ids, attention, completion = (
            rollout["input_ids"],
            rollout["attention_mask"],
            rollout["completion_mask"],
        )
        texts = self.tokenizer.batch_decode(
            [row[m.bool()] for row, m in zip(ids, completion, strict=True)],
            skip_special_tokens=True,
        )
        answers = [a for a in batch["answer"] for _ in range(self.group_size)]
        rewards = torch.tensor(
            [task_reward(t, int(a)) for t, a in zip(texts, answers, strict=True)],
            device=self.device,
        )
        inversion = sequence_inversion(
            self.model, ids, attention_mask=attention, completion_mask=completion
        )
        shaped = corrpo_rewards(
            rewards,
            inversion.rho.to(self.device),
            coef=self.coef,
            gate_threshold=self.gate_threshold,
            valid=inversion.valid,
        )
        advantages = group_advantages(shaped, self.group_size)
        # the training forward; labels mark the completion tokens (for the monitor too)
        labels = ids.masked_fill(completion == 0, -100)
        logits = self.model(input_ids=ids, attention_mask=attention, labels=labels).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        token_logp = logp.gather(2, ids[:, 1:, None])[..., 0]
        mask = completion[:, 1:].float()
        loss = -(advantages[:, None] * token_logp * mask).sum() / mask.sum().clamp(min=1)
        signals = RLStepAccumulator()
        with torch.no_grad():
            signals.add(
                mask=mask.bool(),
                entropies=-(logp.exp() * logp).sum(-1),
                logprobs=token_logp,
                advantages=advantages,
            )
        rl_stats = signals.finish(
            reward_mean=float(shaped.mean()), reward_std=float(shaped.std(unbiased=False))
        )
        usable = inversion.rho[inversion.valid]
        record = {
            "step": float(self.global_step),
            "reward": float(rewards.mean()),
            "accuracy": float((rewards == 1.0).float().mean()),
            "rho_mean": float(usable.mean()) if usable.numel() else float("nan"),
            "unshaped_fraction": inversion.n_unshaped / ids.shape[0],
            "completion_length": float(completion.sum(1).float().mean()),
            "loss": float(loss),
        }
        self.history.append(record)
        self.log_dict({f"grpo/{k}": v for k, v in record.items() if k != "step"})
        return {"loss": loss, "rl_stats": rl_stats}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def prompt_loader(n_problems: int, batch_prompts: int, seed: int) -> DataLoader[Any]:
    problems = arithmetic_problems(n_problems, seed=seed)
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in problems]
    return DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=batch_prompts,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=lambda items: {
            "prompt": [i["prompt"] for i in items],
            "answer": [i["answer"] for i in items],
        },
    )


def main(
    steps: int = 20,
    *,
    coef: float = 0.1,
    gate_threshold: float | None = None,
    batch_prompts: int = 2,
    group_size: int = 4,
    seed: int = 0,
    jsonl_path: str | None = None,
) -> list[dict[str, float]]:
    """Train for ``steps`` steps; returns the per-step history (reward, rho, ...)."""
    pl.seed_everything(seed, verbose=False)
    module = GRPOCorrPO(coef=coef, gate_threshold=gate_threshold, group_size=group_size, seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        callback = InversionLightningCallback(
            every_n_steps=1,
            tokens_per_probe=64,
            jsonl_path=jsonl_path or str(Path(scratch) / "inversion.jsonl"),
            model_attr="model",
            kind="rl",
        )
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        trainer.fit(module, prompt_loader(max(64, steps * batch_prompts), batch_prompts, seed))
    return module.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--coef", type=float, default=0.1)
    parser.add_argument("--gate-threshold", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", default=None, help="where the monitor writes its records")
    ns = parser.parse_args()
    for row in main(
        ns.steps, coef=ns.coef, gate_threshold=ns.gate_threshold, seed=ns.seed, jsonl_path=ns.jsonl
    ):
        print(json.dumps(row))
