"""InversionTrainerCallback in real TRL trainers (SFTTrainer, GRPOTrainer) on tiny models.

CPU only, no downloads: the character tokenizer (no chat template, so plain-text
prompts), tiny llama models and the arithmetic corpus from
``inversion_monitor.toy``; GRPO generates with transformers (no vLLM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer, SFTConfig, SFTTrainer

from inversion_monitor import logit_gradient_norms
from inversion_monitor.callbacks import InversionTrainerCallback
from inversion_monitor.toy.corpus import arithmetic_problems, reasoning_corpus
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.trainers import CPU_ARGS, arithmetic_dataset, grpo_config

pytestmark = pytest.mark.slow


class ProbeRecorder(TrainerCallback):  # type: ignore[misc]
    """Listed after the monitor's callback: keeps what each probe measured, and on what."""

    def __init__(self, callback: InversionTrainerCallback, trainer_inputs: list[Any]) -> None:
        self.callback = callback
        self.trainer_inputs = trainer_inputs  # filled by the trainer subclass, one per forward
        self.probes: list[dict[str, Any]] = []
        self._seen: Any = None
        self._weights: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the weights the monitor's pre-step probe saw (it ran just before this)
        self._weights = {k: v.detach().clone() for k, v in kwargs["model"].state_dict().items()}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.callback.monitor
        if monitor is None or monitor.last_result is None or monitor.last_result is self._seen:
            return
        self._seen = monitor.last_result
        self.probes.append(
            {
                "step": state.global_step,
                "batch": monitor.last_batch,
                "result": monitor.last_result,
                "inputs": self.trainer_inputs[-1] if self.trainer_inputs else None,
                "weights": self._weights,
            }
        )


class RecordingGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
    """The real GRPOTrainer; keeps the inputs of each loss computation for the checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_inputs: list[dict[str, Any]] = []

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        self.loss_inputs.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super()._compute_loss(model, inputs)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def positions_set(result: Any) -> set[tuple[int, int]]:
    return {(int(b), int(t)) for b, t in result.positions.tolist()}


# ---------------------------------------------------------------- SFT


def sft_trainer(
    tmp_path: Path,
    dataset: Dataset,
    callbacks: list[Any],
    *,
    max_steps: int = 6,
    logging_steps: int = 3,
    **args: Any,
) -> SFTTrainer:
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=logging_steps,
        max_length=128,
        **CPU_ARGS,
        **args,
    )
    return SFTTrainer(
        model=tiny_causal_lm("llama").train(),
        args=config,
        train_dataset=dataset,
        processing_class=char_tokenizer(),
        callbacks=callbacks,
    )


def test_sft_logs_and_jsonl_at_probed_steps(tmp_path):
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(every_n_steps=2, jsonl_path=str(path), tokens_per_probe=48)
    dataset = Dataset.from_list([{"text": t} for t in reasoning_corpus(32, seed=1)])
    trainer = sft_trainer(tmp_path, dataset, [callback])
    trainer.train()

    history = trainer.state.log_history
    probed = [e for e in history if "inversion/spearman" in e]
    assert [e["step"] for e in probed] == [2, 4, 6]
    for entry in probed:
        assert entry["inversion/n"] == 48 and entry["inversion/entropy_mean"] > 0
        assert (
            entry["inversion/ci_low"] <= entry["inversion/spearman"] <= entry["inversion/ci_high"]
        )
    assert [r["step"] for r in records(path)] == [1, 2, 3, 4, 5, 6]  # a health record a step
    got = [r for r in records(path) if r["probed"]]
    assert [r["step"] for r in got] == [2, 4, 6]
    assert all(r["n"] == 48 for r in got)
    assert all(r["kind"] == "sft" and "rl" not in r for r in got)
    # SFTTrainer.log averages and clears its own metrics on every call: the monitor's
    # entries must leave them to the regular logging steps (3 and 6), complete
    regular = [e for e in history if "mean_token_accuracy" in e]
    assert [e["step"] for e in regular] == [3, 6]
    assert all("loss" in e and "entropy" in e for e in regular)
    assert not any("mean_token_accuracy" in e for e in probed)
    assert callback.resume_state["probes"] == 3


def test_sft_completion_only_loss_probes_completion_tokens_only(tmp_path):
    callback = InversionTrainerCallback(every_n_steps=1, tokens_per_probe=4096)
    problems = arithmetic_problems(16, seed=2)
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "completion": p.completion} for p in problems]
    )
    recorder = ProbeRecorder(callback, [])
    trainer = sft_trainer(tmp_path, dataset, [callback, recorder], max_steps=2, logging_steps=2)
    trainer.train()
    assert [p["step"] for p in recorder.probes] == [1, 2]
    for probe in recorder.probes:
        batch, result = probe["batch"], probe["result"]
        labels, mask = batch.labels, batch.attention_mask
        assert labels is not None and mask is not None  # TRL passes both to the model
        # every position whose next token is a (non -100) completion label, and only those
        expected = {
            (b, t)
            for b in range(labels.shape[0])
            for t in range(labels.shape[1] - 1)
            if labels[b, t + 1] != -100 and mask[b, t] and mask[b, t + 1]
        }
        prompt_positions = {(b, t) for b, t in expected if t < 5}
        assert expected and not prompt_positions  # "Q: " + at least one char is prompt
        assert bool(((labels == -100) & mask.bool()).any())  # real tokens left out: the prompts
        assert positions_set(result) == expected
        assert result.tokens.tolist() == [int(labels[b, t + 1]) for b, t in result.positions]


def test_sft_packing_probes_each_document_on_its_own(tmp_path):
    callback = InversionTrainerCallback(every_n_steps=1, tokens_per_probe=24, layers=[0, -1])
    texts = reasoning_corpus(16, seed=3)
    dataset = Dataset.from_list([{"text": t} for t in texts])
    recorder = ProbeRecorder(callback, [])
    trainer = sft_trainer(
        tmp_path, dataset, [callback, recorder], max_steps=1, logging_steps=1, packing=True
    )
    trainer.train()
    (probe,) = recorder.probes
    batch, result = probe["batch"], probe["result"]
    assert len(result) == 24
    # the model saw one packed row; the probe measured one row per document
    documents = {tuple(char_tokenizer()(text + "</s>")["input_ids"]) for text in texts}
    assert batch.attention_mask is not None and batch.input_ids.shape[0] > 1
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [tuple(batch.input_ids[r, :n].tolist()) for r, n in enumerate(lengths)]
    assert all(row in documents for row in rows)
    # each target measured on its document alone gives the same values (on the
    # weights the probe saw, before the optimizer step)
    model = trainer.model
    model.load_state_dict(probe["weights"])
    for index, (row, t) in enumerate(result.positions.tolist()):
        alone = logit_gradient_norms(
            model,
            torch.tensor([rows[row]]),
            positions=torch.tensor([[0, t]]),
            layers=[0, -1],
        )
        torch.testing.assert_close(alone.entropy[0], result.entropy[index])
        torch.testing.assert_close(alone.score[0], result.score[index], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- GRPO


def answer_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1 for the right answer, else a small length-based reward (so advantages vary)."""
    return [1.0 if a in c else len(c) / 64 for c, a in zip(completions, answer, strict=True)]


def grpo_trainer(
    tmp_path: Path, callbacks: list[Any], *, max_steps: int = 4, logging_steps: int = 2
) -> RecordingGRPOTrainer:
    return RecordingGRPOTrainer(
        model=tiny_causal_lm("llama").train(),
        reward_funcs=answer_reward,
        args=grpo_config(tmp_path / "out", max_steps, logging_steps=logging_steps),
        train_dataset=arithmetic_dataset(16, seed=5),
        processing_class=char_tokenizer(),
        callbacks=callbacks,
    )


def test_grpo_probes_exactly_the_completion_positions(tmp_path):
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(
        every_n_steps=1, jsonl_path=str(path), tokens_per_probe=4096
    )
    trainer_inputs: list[Any] = []
    recorder = ProbeRecorder(callback, trainer_inputs)
    trainer = grpo_trainer(tmp_path, [callback, recorder])
    recorder.trainer_inputs = trainer.loss_inputs
    trainer.train()

    assert [p["step"] for p in recorder.probes] == [1, 2, 3, 4]
    assert [r["step"] for r in records(path)] == [1, 2, 3, 4]
    history = trainer.state.log_history
    n_logged = [e["inversion/n"] for e in history if "inversion/n" in e]
    early_stops = 0
    for probe, n in zip(recorder.probes, n_logged, strict=True):
        batch, result, inputs = probe["batch"], probe["result"], probe["inputs"]
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        width = prompt_ids.shape[1]  # P: left-padded prompts, then C completion columns
        # the captured batch is the loss forward's (not a generation forward's)
        assert torch.equal(batch.input_ids, torch.cat([prompt_ids, completion_ids], dim=1))
        assert batch.logits_to_keep is None  # TRL 1.16 marks completions with labels instead
        # position t predicts token t + 1: exactly the real completion tokens are targets
        expected = {
            (b, width - 1 + j)
            for b in range(completion_ids.shape[0])
            for j in range(completion_ids.shape[1])
            if completion_mask[b, j]
        }
        assert positions_set(result) == expected and n == len(expected)
        t = result.positions[:, 1]
        total = batch.input_ids.shape[1]
        assert bool((t >= total - (completion_ids.shape[1] + 1)).all())  # never a prompt position
        assert result.tokens.tolist() == [
            int(completion_ids[b, t - width + 1]) for b, t in result.positions.tolist()
        ]
        # the prompt region had valid positions: the restriction is real
        prompt_valid = (
            batch.attention_mask[:, : width - 1].bool() & batch.attention_mask[:, 1:width].bool()
        )
        assert bool(prompt_valid.any())
        early_stops += int((completion_mask == 0).any())
    assert early_stops > 0, "no completion ended early (EOS): the mask holes went untested"


def test_grpo_metrics_keep_their_cadence(tmp_path):
    callback = InversionTrainerCallback(every_n_steps=1, tokens_per_probe=16)
    trainer = grpo_trainer(tmp_path, [callback], max_steps=4, logging_steps=2)
    trainer.train()
    history = trainer.state.log_history
    probed = [e for e in history if "inversion/n" in e]
    regular = [e for e in history if "reward" in e]
    assert [e["step"] for e in probed] == [1, 2, 3, 4]
    assert [e["step"] for e in regular] == [2, 4]  # GRPOTrainer.log averages over 2 steps
    assert not any("reward" in e or "completions/mean_length" in e for e in probed)
    assert all(e["inversion/n"] == 16 for e in probed)
