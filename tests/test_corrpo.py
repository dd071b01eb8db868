"""CorR-PO building blocks: shaping math, group advantages, per-sequence inversion."""

from __future__ import annotations

import math

import pytest
import torch

from inversion_monitor import (
    corrpo_rewards,
    group_advantages,
    inversion_stats,
    logit_gradient_norms,
    sequence_inversion,
)
from inversion_monitor.toy.models import tiny_causal_lm

# ---------------------------------------------------------------- corrpo_rewards


def test_more_negative_rho_earns_more():
    rewards = torch.tensor([0.5, 0.5, 0.5])
    rho = torch.tensor([-0.8, 0.0, 0.6])
    shaped = corrpo_rewards(rewards, rho, coef=0.1)
    assert shaped[0] > shaped[1] > shaped[2]
    torch.testing.assert_close(shaped, torch.tensor([0.58, 0.5, 0.44]))


def test_gate_and_validity_leave_rewards_unshaped():
    rewards = torch.tensor([1.0, 0.2, 1.0, 1.0, 0.9])
    rho = torch.tensor([-0.5, -0.5, float("nan"), -0.5, 0.4], dtype=torch.float64)
    valid = torch.tensor([True, True, False, False, True])
    shaped = corrpo_rewards(rewards, rho, coef=0.2, gate_threshold=0.5, valid=valid)
    # 0: shaped; 1: fails the gate; 2: NaN rho; 3: not valid; 4: shaped (rho > 0 costs)
    torch.testing.assert_close(shaped, torch.tensor([1.1, 0.2, 1.0, 1.0, 0.82]))
    ungated = corrpo_rewards(rewards, rho, coef=0.2)
    torch.testing.assert_close(ungated, torch.tensor([1.1, 0.3, 1.0, 1.1, 0.82]))


def test_coef_zero_is_identity_and_dtype_is_kept():
    rewards = torch.tensor([0.25, 0.75], dtype=torch.float64)
    shaped = corrpo_rewards(rewards, torch.tensor([0.3, -0.3]), coef=0.0)
    assert shaped.dtype == torch.float64 and torch.equal(shaped, rewards)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": torch.zeros(2)}, ValueError, "rho: expected shape"),
        ({"coef": -0.1}, ValueError, "coef: expected >= 0"),
        ({"coef": float("nan")}, TypeError, "coef"),
        ({"valid": torch.ones(2, dtype=torch.bool)}, ValueError, "valid: expected shape"),
        ({"rewards": torch.tensor([1, 0, 1])}, TypeError, "rewards: expected a floating"),
        ({"rewards": torch.zeros(3, 1)}, ValueError, "rewards: expected a 1-D"),
    ],
)
def test_corrpo_rewards_rejects_bad_input(kwargs, error, match):
    args = {"rewards": torch.zeros(3), "rho": torch.zeros(3), "coef": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        corrpo_rewards(**args)


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.4, 0.9])
    out = group_advantages(rewards, 3, eps=1e-4)
    for g in range(2):
        values = rewards[3 * g : 3 * g + 3].tolist()
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # unbiased, as TRL
        expected = [(v - mean) / (std + 1e-4) for v in values]
        assert out[3 * g : 3 * g + 3].tolist() == pytest.approx(expected, rel=1e-6)
    mean_all = sum(rewards.tolist()) / 6
    std_all = math.sqrt(sum((v - mean_all) ** 2 for v in rewards.tolist()) / 5)
    batch = group_advantages(rewards, 3, scale="batch")
    expected_batch = [
        (v - sum(rewards[3 * (i // 3) : 3 * (i // 3) + 3].tolist()) / 3) / (std_all + 1e-4)
        for i, v in enumerate(rewards.tolist())
    ]
    assert batch.tolist() == pytest.approx(expected_batch, rel=1e-6)
    none = group_advantages(rewards, 3, scale="none")
    assert none.tolist() == pytest.approx([0.5, -0.5, 0.0, -0.3, -0.1, 0.4], abs=1e-6)


def test_group_advantages_nan_free_on_degenerate_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for scale in ("group", "batch", "none"):
        out = group_advantages(rewards, 3, scale=scale)
        assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(6))
    single = group_advantages(torch.tensor([0.3, 0.7]), 1)
    assert torch.equal(single, torch.zeros(2))
    all_same = group_advantages(torch.full((4,), 0.5), 4, scale="batch")
    assert torch.equal(all_same, torch.zeros(4))


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=0.0)


# ---------------------------------------------------------------- sequence_inversion


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts, right-padded completions of different lengths (like TRL)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (4, 24), generator=gen)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 8:] = 1
    attention[0, :3] = 0  # prompt padding
    attention[1, 20:] = 0  # early EOS: completion shorter
    completion[1, 20:] = 0
    attention[2, 12:] = 0  # only 4 completion tokens: too few
    completion[2, 12:] = 0
    ids[attention == 0] = 0
    return ids, attention, completion


@pytest.mark.parametrize(
    ("method", "layers", "projections"),
    [("spearman", None, None), ("pearson", [0, -1], ("q", "v"))],
)
def test_sequence_inversion_equals_per_sequence_probe(method, layers, projections):
    model = tiny_causal_lm("llama", num_layers=2)
    ids, attention, completion = _batch()
    inv = sequence_inversion(
        model,
        ids,
        attention_mask=attention,
        completion_mask=completion,
        method=method,
        layers=layers,
        projections=projections,
    )
    assert inv.n.tolist() == [16, 12, 4, 16]
    assert inv.valid.tolist() == [True, True, False, True] and inv.n_unshaped == 1
    assert math.isnan(float(inv.rho[2]))
    for b in (0, 1, 3):
        # brute force: this sequence alone, its completion targets listed by hand
        last = int(attention[b].nonzero().max())
        t = [t for t in range(7, last) if attention[b, t]]
        alone = logit_gradient_norms(
            model,
            ids[b : b + 1],
            attention_mask=attention[b : b + 1],
            positions=torch.tensor([[0, s] for s in t]),
            layers=layers,
            projections=projections or ("q", "o"),
        )
        stats = inversion_stats(alone.entropy, alone.score, method=method)
        assert inv.n[b] == len(t) == stats.n
        assert float(inv.rho[b]) == pytest.approx(stats.rho, abs=1e-5)


def test_sequence_inversion_without_completion_mask_uses_every_token_and_leaves_model():
    model = tiny_causal_lm("llama", num_layers=2).train()
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    inv = sequence_inversion(model, ids, min_tokens=4)
    assert inv.n.tolist() == [9, 9] and model.training
    assert all(p.grad is None for p in model.parameters())


def test_sequence_inversion_rejects_bad_input():
    model = tiny_causal_lm("llama", num_layers=1)
    ids = torch.randint(4, 100, (2, 10))
    with pytest.raises(ValueError, match="completion_mask: expected the shape"):
        sequence_inversion(model, ids, completion_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="min_tokens"):
        sequence_inversion(model, ids, min_tokens=3)
    with pytest.raises(ValueError, match="method"):
        sequence_inversion(model, ids, method="kendall")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input_ids"):
        sequence_inversion(model, ids.float())
