"""CorR-PO in a real TRL GRPOTrainer (tiny llama, char tokenizer, CPU, no vLLM)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from inversion_monitor import corrpo_rewards, group_advantages, sequence_inversion
from inversion_monitor.callbacks.trl_corrpo import CorrPOConfig, CorrPOGRPOTrainer
from inversion_monitor.toy.models import tiny_causal_lm
from inversion_monitor.toy.tokenizer import char_tokenizer
from tests.trainers import arithmetic_dataset, grpo_config

pytestmark = pytest.mark.slow


def answer_reward(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1 for the right answer, else a small length-based reward (so rewards vary)."""
    return [1.0 if a in c else len(c) / 64 for c, a in zip(completions, answer, strict=True)]


class RecordingTrainer(CorrPOGRPOTrainer):
    """Keeps, per generation batch: the policy as it was, the rewards and the scored batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rollouts: list[dict[str, Any]] = []

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        # a copy of the weights in a fresh module: a deepcopy would keep the forward that
        # accelerate patched onto the instance, which still runs the live model
        with torch.random.fork_rng():  # building it must not move the trainer's RNG
            policy = type(self.model)(self.model.config)
        policy.load_state_dict(self.model.state_dict())
        policy.train(self.model.training)
        out = super()._generate_and_score_completions(inputs)
        assert self.last_corrpo is not None
        self.rollouts[-1].update(policy=policy, output=out, corrpo=self.last_corrpo)
        return out

    def _calculate_rewards(self, *args: Any) -> torch.Tensor:
        rewards = super()._calculate_rewards(*args)
        self.rollouts.append({"rewards_per_func": rewards.clone()})
        return rewards


def make_trainer(tmp_path: Path, corrpo: CorrPOConfig, *, max_steps: int = 3) -> RecordingTrainer:
    config = grpo_config(
        tmp_path / "out",
        max_steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
    )
    return RecordingTrainer(
        model=tiny_causal_lm("llama").train(),
        reward_funcs=answer_reward,
        args=config,
        train_dataset=arithmetic_dataset(16, seed=5),
        processing_class=char_tokenizer(),
        corrpo=corrpo,
    )


def test_grpo_with_corrpo_shapes_rewards_before_normalisation(tmp_path):
    corrpo = CorrPOConfig(coef=0.5, gate_threshold=0.2, min_tokens=6)
    trainer = make_trainer(tmp_path, corrpo)
    trainer.train()
    assert trainer.state.global_step == 3 and len(trainer.rollouts) == 3
    shaped_any = gated_any = 0
    for rollout in trainer.rollouts:
        out, rewards_per_func = rollout["output"], rollout["rewards_per_func"]
        # the very tokens the trainer trains on, as it holds them
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        completion = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1)
        assert torch.equal(rollout["corrpo"].input_ids, input_ids)
        # independently through the core API, on the policy as it was at generation
        inversion = sequence_inversion(
            rollout["policy"],
            input_ids,
            attention_mask=attention,
            completion_mask=completion,
            min_tokens=6,
        )
        task = rewards_per_func[:, 0]
        expected = corrpo_rewards(
            task, inversion.rho, coef=0.5, gate_threshold=0.2, valid=inversion.valid
        )
        shaped = rewards_per_func.sum(1)  # reward weights are 1, 1: r + corrpo column
        torch.testing.assert_close(shaped, expected, rtol=1e-5, atol=1e-6)
        by_hand = task - 0.5 * inversion.rho.float()
        applied = inversion.valid & (task >= 0.2)
        torch.testing.assert_close(shaped[applied], by_hand[applied], rtol=1e-5, atol=1e-6)
        assert torch.equal(shaped[~applied], task[~applied])
        shaped_any += int(applied.sum())
        gated_any += int((inversion.valid & (task < 0.2)).sum())
        # the advantages are the group-normalised *shaped* rewards
        torch.testing.assert_close(
            out["advantages"], group_advantages(shaped, 4), rtol=1e-4, atol=1e-5
        )
    assert shaped_any > 0
    history = trainer.state.log_history
    logged = [e for e in history if "corrpo/rho_mean" in e]
    assert len(logged) == 3
    for entry in logged:
        for key in ("corrpo/rho_std", "corrpo/shaping_mean", "corrpo/unshaped_fraction"):
            assert key in entry and math.isfinite(entry[key])
        assert -1 <= entry["corrpo/rho_mean"] <= 1
        assert 0 <= entry["corrpo/unshaped_fraction"] <= 1
        assert "rewards/corrpo/mean" in entry and "rewards/answer_reward/mean" in entry
    expected_fraction = [
        1 - float((r["corrpo"].valid & (r["corrpo"].task_rewards >= 0.2)).float().mean())
        for r in trainer.rollouts
    ]
    assert [e["corrpo/unshaped_fraction"] for e in logged] == pytest.approx(expected_fraction)
    assert gated_any > 0  # the gate held some measurable completions back


def test_corrpo_trainer_rejects_bad_settings(tmp_path):
    with pytest.raises(TypeError, match="corrpo: expected a CorrPOConfig or a float"):
        make_trainer(tmp_path, "strong")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coef"):
        CorrPOConfig(coef=-0.1)
    with pytest.raises(ValueError, match="min_tokens"):
        CorrPOConfig(min_tokens=2)


def test_an_unsupported_trl_is_refused_when_the_trainer_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module imports whatever the TRL version; making the trainer names it and the fix."""
    from inversion_monitor.callbacks import trl_corrpo

    monkeypatch.setattr(trl_corrpo, "_dist_version", lambda name: "0.19.1")
    with pytest.raises(trl_corrpo.UnsupportedTRLVersion) as caught:
        make_trainer(tmp_path, CorrPOConfig())
    message = str(caught.value)
    assert "trl 0.19.1 is installed" in message
    assert "pip install 'trl>=1.16,<2'" in message
