"""RL signals read from a real TRL GRPOTrainer's loss tensors, against a brute-force reference."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from inversion_monitor.callbacks import InversionTrainerCallback
from inversion_monitor.callbacks.trl_signals import GRPOSignalTap, trainer_kind
from inversion_monitor.metrics.covariance import entropy_covariance
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.test_callback_trl import RecordingGRPOTrainer, answer_reward, records
from tests.trainers import arithmetic_dataset, grpo_config

pytestmark = pytest.mark.slow


class TensorRecordingGRPOTrainer(RecordingGRPOTrainer):
    """Also keeps the log-probs and entropies of each loss computation (the reference)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_tensors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if kwargs.get("compute_entropy") and self.model.training:
            self.loss_tensors.append((out[0].detach().clone(), out[1].detach().clone()))
        return out


def reference(micro_batches: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> dict:
    """Covariance and entropy of one optimizer step by brute force over its micro-batches."""
    width = max(inputs["completion_mask"].shape[1] for inputs, _, _ in micro_batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    mask = torch.cat([pad(i["completion_mask"]) for i, _, _ in micro_batches]).bool()
    logps = torch.cat([pad(lp) for _, lp, _ in micro_batches])
    entropies = torch.cat([pad(h) for _, _, h in micro_batches])
    advantages = torch.cat([i["advantages"] for i, _, _ in micro_batches])
    return {
        "cov": float(entropy_covariance(logps, advantages, mask)),
        "entropy": float(entropies[mask].double().mean()),
        "advantage": float(advantages.double().mean()),
    }


def test_grpo_records_carry_the_steps_rl_signals(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(every_n_steps=1, jsonl_path=str(path), tokens_per_probe=16)
    # two micro-batches pooled per optimizer step
    config = grpo_config(tmp_path / "out", 3, gradient_accumulation_steps=2)
    trainer = TensorRecordingGRPOTrainer(
        model=tiny_causal_lm("llama").train(),
        reward_funcs=answer_reward,
        args=config,
        train_dataset=arithmetic_dataset(16, seed=5),
        processing_class=char_tokenizer(),
        callbacks=[callback],
    )
    assert trainer_kind(trainer) == "rl"
    trainer.train()

    got = records(path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(r["kind"] == "rl" for r in got)
    assert len(trainer.loss_inputs) == len(trainer.loss_tensors) == 6
    logged = {e["step"]: e for e in trainer.state.log_history if "reward" in e}
    for index, rec in enumerate(got):
        rl = rec["rl"]
        step_batches = [
            (trainer.loss_inputs[i], *trainer.loss_tensors[i]) for i in (2 * index, 2 * index + 1)
        ]
        expected = reference(step_batches)
        assert rl["entropy_covariance"] == pytest.approx(expected["cov"], rel=1e-6, abs=1e-9)
        assert rl["policy_entropy_mean"] == pytest.approx(expected["entropy"], rel=1e-6)
        assert rl["advantage_mean"] == pytest.approx(expected["advantage"], abs=1e-6)
        assert rl["policy_entropy_p10"] <= rl["policy_entropy_p50"] <= rl["policy_entropy_p90"]
        # the reward TRL logs for the generation batch of this step
        assert rl["reward_mean"] == pytest.approx(logged[rec["step"]]["reward"], rel=1e-6)
        assert rl["reward_std"] == pytest.approx(logged[rec["step"]]["reward_std"], rel=1e-6)
        assert rl["steps"] == 1 and rl["tokens"] == int(
            sum(int(i["completion_mask"].sum()) for i, _, _ in step_batches)
        )
    history = trainer.state.log_history
    assert [e["step"] for e in history if "rl/entropy_covariance" in e] == [1, 2, 3]
    # the tap is gone after training: the trainer's methods are its class's again
    assert "_compute_loss" not in vars(trainer)
    assert "_get_per_token_logps_and_entropies" not in vars(trainer)


def test_grpo_sends_reward_kl_clip_and_length_every_step_whatever_the_schedule(
    tmp_path: Path,
) -> None:
    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(every_n_steps=10_000, jsonl_path=str(path))
    # a reference model (beta > 0): TRL logs the KL
    config = grpo_config(tmp_path / "out", 4, gradient_accumulation_steps=2, beta=0.1)
    policy = tiny_causal_lm("llama").train()
    policy.save_pretrained(tmp_path / "policy")  # TRL loads the reference model from here
    policy.config._name_or_path = str(tmp_path / "policy")
    trainer = TensorRecordingGRPOTrainer(
        model=policy,
        reward_funcs=answer_reward,
        args=config,
        train_dataset=arithmetic_dataset(16, seed=5),
        processing_class=char_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    got = records(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert not any(r["probed"] for r in got) and callback.resume_state["probes"] == 0
    logged = {e["step"]: e for e in trainer.state.log_history if "reward" in e}
    for rec in got:
        entry = logged[rec["step"]]
        assert rec["reward_mean"] == pytest.approx(entry["reward"], rel=1e-6)
        assert rec["reward_std"] == pytest.approx(entry["reward_std"], rel=1e-6)
        assert rec["kl"] == pytest.approx(entry["kl"], rel=1e-6, abs=1e-12)
        assert rec["clip_ratio"] == pytest.approx(entry["clip_ratio/region_mean"], abs=1e-12)
        assert rec["completion_length_mean"] == pytest.approx(
            entry["completions/mean_length"], rel=1e-6
        )
        assert rec["loss"] == pytest.approx(entry["loss"], rel=1e-5, abs=1e-9)
        assert rec["grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert rec["learning_rate"] == entry["learning_rate"]
        # pooled over the step's completion tokens (TRL averages per micro-batch means)
        assert rec["policy_entropy_mean"] > 0
    assert any(rec["kl"] > 0 for rec in got[1:])  # the policy moved from the reference
    assert "training_step" not in vars(trainer) and "_get_grad_norm" not in vars(trainer)


def test_tap_fails_open(tmp_path: Path) -> None:
    """A trainer whose loss inputs lack what the tap reads: one warning, training goes on."""

    class Odd:
        training = True

    class GRPOTrainer:  # only the name matters to trainer_kind
        def __init__(self) -> None:
            self._metrics: dict[str, Any] = {}

        def _compute_loss(self, model: Any, inputs: Any) -> str:
            self._get_per_token_logps_and_entropies(compute_entropy=True)
            return "loss"

        def _get_per_token_logps_and_entropies(self, **kwargs: Any) -> Any:
            return torch.zeros(1, 2), torch.zeros(1, 2), None

    trainer = GRPOTrainer()
    tap = GRPOSignalTap.attach(trainer)
    assert tap is not None
    with pytest.warns(RuntimeWarning, match="stopped reading GRPO's RL signals"):
        assert trainer._compute_loss(Odd(), {}) == "loss"  # no completion_mask
    assert trainer._compute_loss(Odd(), {}) == "loss" and tap.finish() is None
    tap.remove()
    assert "_compute_loss" not in vars(trainer)
    assert GRPOSignalTap.attach(object()) is None


def test_corrpo_trainer_streams_rl_signals_too(tmp_path: Path) -> None:
    from inversion_monitor.callbacks.trl_corrpo import CorrPOConfig, CorrPOGRPOTrainer

    path = tmp_path / "records.jsonl"
    callback = InversionTrainerCallback(every_n_steps=1, jsonl_path=str(path), tokens_per_probe=16)
    trainer = CorrPOGRPOTrainer(
        model=tiny_causal_lm("llama").train(),
        reward_funcs=answer_reward,
        args=grpo_config(tmp_path / "out", 2),
        train_dataset=arithmetic_dataset(8, seed=6),
        processing_class=char_tokenizer(),
        callbacks=[callback],
        corrpo=CorrPOConfig(coef=0.1, min_tokens=4),
    )
    trainer.train()
    got = records(path)
    assert [(r["step"], r["kind"]) for r in got] == [(1, "rl"), (2, "rl")]
    logged = {e["step"]: e for e in trainer.state.log_history if "reward" in e}
    for rec in got:
        rl = rec["rl"]
        # the shaped reward TRL optimises (task reward plus the corrpo column)
        assert rl["reward_mean"] == pytest.approx(logged[rec["step"]]["reward"], rel=1e-6)
        assert math.isfinite(rl["entropy_covariance"]) and rl["policy_entropy_mean"] > 0


def test_trainer_kind_of_the_installed_trainers() -> None:
    import trl
    from transformers import Trainer

    def kind(cls: type) -> str:
        return trainer_kind(object.__new__(cls))  # the class decides; no construction

    assert kind(trl.GRPOTrainer) == kind(trl.RLOOTrainer) == "rl"
    assert kind(trl.SFTTrainer) == kind(Trainer) == "sft"
    assert kind(trl.DPOTrainer) == kind(trl.RewardTrainer) == kind(trl.KTOTrainer) == "custom"
