"""RL signals from a policy-gradient step's tensors: exact against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from inversion_monitor.metrics.covariance import entropy_covariance
from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.rl.signals import RLStats, RLStepAccumulator, rl_stats_from_mapping
from inversion_monitor.telemetry.wire import stats_from_mapping, step_record, validate_stats

STATS = {"spearman": -0.5, "pearson": -0.4, "n": 64, "entropy_mean": 1.2, "score_mean": 3.4}


def micro_batch(
    gen: torch.Generator, rows: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logps = -torch.rand(rows, width, generator=gen, dtype=torch.float32) * 4
    entropies = torch.rand(rows, width, generator=gen) * 3
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logps[~mask] = -math.inf  # padding the accumulator must never read
    entropies[~mask] = math.nan
    advantages = torch.randn(rows, generator=gen)
    return logps, entropies, mask, advantages


def test_pooled_micro_batches_equal_the_concatenated_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [micro_batch(gen, 3, w) for w in (5, 7, 4)]
    acc = RLStepAccumulator()
    for logps, entropies, mask, advantages in batches:
        acc.add(mask=mask, entropies=entropies, logprobs=logps, advantages=advantages)
    stats = acc.finish(reward_mean=0.25, reward_std=0.5)
    # brute force: pad every micro-batch to one width and concatenate
    width = max(b[0].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    logps = torch.cat([pad(b[0], 0.0) for b in batches])
    entropies = torch.cat([pad(b[1], 0.0) for b in batches])
    mask = torch.cat([pad(b[2].float(), 0.0) for b in batches]).bool()
    advantages = torch.cat([b[3] for b in batches])
    expected_cov = float(entropy_covariance(logps, advantages, mask))
    assert stats.entropy_covariance == pytest.approx(expected_cov, rel=1e-9, abs=1e-12)
    h = entropies[mask].double()
    assert stats.policy_entropy_mean == pytest.approx(float(h.mean()), rel=1e-12)
    q = torch.quantile(h, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert (stats.policy_entropy_p10, stats.policy_entropy_p50, stats.policy_entropy_p90) == (
        pytest.approx(float(q[0])),
        pytest.approx(float(q[1])),
        pytest.approx(float(q[2])),
    )
    assert stats.advantage_mean == pytest.approx(float(advantages.double().mean()))
    assert stats.advantage_p50 == pytest.approx(float(advantages.double().median()), abs=1e-6)
    assert (stats.reward_mean, stats.reward_std, stats.tokens) == (0.25, 0.5, int(mask.sum()))
    assert acc.empty  # finish resets for the next step


def test_per_token_advantages_and_capped_quantile_sample() -> None:
    gen = torch.Generator().manual_seed(1)
    logps, entropies, mask, _ = micro_batch(gen, 4, 50)
    advantages = torch.randn(4, 50, generator=gen)
    acc = RLStepAccumulator(max_tokens=16)
    acc.add(mask=mask, entropies=entropies, logprobs=logps, advantages=advantages)
    stats = acc.finish()
    clean = torch.where(mask, logps, torch.zeros(()))
    expected = float(entropy_covariance(clean, advantages, mask))
    assert stats.entropy_covariance == pytest.approx(expected, rel=1e-9)
    # the mean uses every token; quantiles come from at most 16 of them
    assert stats.policy_entropy_mean == pytest.approx(float(entropies[mask].double().mean()))
    assert 0.0 <= stats.policy_entropy_p10 <= stats.policy_entropy_p90 <= 3.0
    assert math.isnan(stats.reward_mean)


def test_accumulator_errors_name_the_argument() -> None:
    acc = RLStepAccumulator()
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"advantages: expected shape \(B,\) = \(2,\)"):
        acc.add(mask=mask, advantages=torch.zeros(3))
    with pytest.raises(TypeError, match="entropies: expected a floating-point tensor"):
        acc.add(mask=mask, entropies=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_tokens=0"):
        RLStepAccumulator(max_tokens=0)
    assert math.isnan(RLStepAccumulator().finish().entropy_covariance)  # nothing seen: NaN


def test_average_over_steps_ignores_missing_values() -> None:
    merged = RLStats.average(
        [RLStats(reward_mean=0.2, tokens=10), RLStats(reward_mean=math.nan, tokens=5)]
    )
    assert merged is not None
    assert (merged.reward_mean, merged.tokens, merged.steps) == (0.2, 15, 2)
    assert RLStats.average([]) is None


def test_record_carries_rl_fields_and_mapping_keys() -> None:
    rl = RLStats(
        reward_mean=0.5,
        reward_std=0.1,
        policy_entropy_mean=1.5,
        policy_entropy_p10=0.2,
        advantage_mean=0.0,
        advantage_p90=1.2,
        entropy_covariance=0.03,
    )
    rec = step_record(run_id="r", rank=0, step=1, wall_time=1.0, stats=validate_stats(STATS), rl=rl)
    assert (rec.reward_mean, rec.reward_std, rec.policy_entropy_mean) == (0.5, 0.1, 1.5)
    assert rec.entropy_covariance == 0.03
    assert rec.policy_entropy.p10 == 0.2 and not rec.policy_entropy.HasField("p50")
    assert rec.advantage.p90 == 1.2
    # an explicit entropy_covariance argument wins over rl's
    rec = step_record(
        run_id="r", rank=0, step=1, wall_time=1.0, stats=validate_stats(STATS), rl=rl,
        entropy_covariance=0.5,
    )  # fmt: skip
    assert rec.entropy_covariance == 0.5
    keys = {**STATS, "reward_mean": 0.7, "policy_entropy_mean": 2.0}
    assert stats_from_mapping(keys).n == 64  # RL keys are not inversion statistics
    got = rl_stats_from_mapping(keys)
    assert got is not None and (got.reward_mean, got.policy_entropy_mean) == (0.7, 2.0)
    with pytest.raises(ValueError, match=r"stats\['reward_mean'\] = True is not a number"):
        rl_stats_from_mapping({"reward_mean": True})
    assert isinstance(rec, monitor_pb2.StepRecord)


def test_low_precision_inputs_are_reduced_in_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    logps, entropies, mask, advantages = micro_batch(gen, 4, 9)
    clean_lp = torch.where(mask, logps, torch.zeros(())).bfloat16()
    acc = RLStepAccumulator()
    acc.add(
        mask=mask,
        entropies=entropies.nan_to_num(0.0).bfloat16(),
        logprobs=clean_lp,
        advantages=advantages.bfloat16(),
    )
    stats = acc.finish()
    # exactly the float64 statistics of the bfloat16 values
    expected = float(entropy_covariance(clean_lp.double(), advantages.bfloat16().double(), mask))
    assert stats.entropy_covariance == pytest.approx(expected, rel=1e-12, abs=1e-15)
    h = entropies.nan_to_num(0.0).bfloat16().double()[mask]
    assert stats.policy_entropy_mean == pytest.approx(float(h.mean()), rel=1e-12)
