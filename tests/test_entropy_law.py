"""The entropy-performance law fit (robust, with calibrated uncertainty) and EntropyExhaustion."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from benchmarks.detection.synthetic import synthetic_healthy
from inversion_monitor.server.detectors import (
    AlertsConfig,
    EntropyExhaustion,
    ExhaustionConfig,
    Observation,
    RunDetectors,
)
from inversion_monitor.server.entropy_law import EntropyLawTracker, fit_entropy_law

A, B = 0.4, 1.2  # ceiling -A + B = 0.8


def law_run(
    steps: int, rng: random.Random, noise: float, h0: float = 1.5, tau: float = 60.0
) -> list[tuple[int, float, float]]:
    out = []
    for step in range(steps):
        h = 0.02 + h0 * math.exp(-step / tau) + rng.gauss(0.0, 0.01)
        out.append((step, h, -A * math.exp(h) + B + rng.gauss(0.0, noise)))
    return out


def test_exact_law_is_recovered() -> None:
    hs = [1.5 - 0.1 * i for i in range(15)]
    fit = fit_entropy_law(hs, [-A * math.exp(h) + B for h in hs])
    assert fit is not None and fit.valid
    assert (fit.ceiling, fit.a, fit.b) == (
        pytest.approx(0.8, abs=1e-9),
        pytest.approx(A, abs=1e-9),
        pytest.approx(B, abs=1e-9),
    )
    assert fit.reward_at(0.0) == pytest.approx(fit.ceiling)


def test_not_valid_until_entropy_moved_or_when_reward_does_not_rise() -> None:
    flat = [1.0 + 0.001 * (i % 3) for i in range(30)]
    fit = fit_entropy_law(flat, [0.1 * (i % 5) for i in range(30)])
    assert fit is None or not fit.valid
    hs = [1.5 - 0.05 * i for i in range(30)]
    falling_reward = fit_entropy_law(hs, [0.1 + 0.2 * h for h in hs])  # reward falls with entropy
    assert falling_reward is not None and not falling_reward.valid
    assert fit_entropy_law([1.0], [0.5]) is None
    with pytest.raises(ValueError, match="entropies has 2 values but rewards has 1"):
        fit_entropy_law([1.0, 0.5], [0.5])


def test_ceiling_interval_is_calibrated_and_robust_to_outliers() -> None:
    """Over 200 noisy runs the 95% interval covers the true ceiling about 95% of the time."""
    rng = random.Random(7)
    covered = 0
    for _ in range(200):
        run = law_run(100, rng, noise=0.03)
        fit = fit_entropy_law([h for _, h, _ in run], [r for _, _, r in run])
        assert fit is not None and fit.valid
        covered += abs(fit.ceiling - 0.8) <= 1.96 * fit.ceiling_se
    assert 0.88 <= covered / 200 <= 0.995
    run = law_run(100, rng, noise=0.03)
    rewards = [r for _, _, r in run]
    for i in range(0, 100, 10):
        rewards[i] += 3.0  # 10% wild rewards (a broken reward function for a while)
    hs = [h for _, h, _ in run]
    fit = fit_entropy_law(hs, rewards)
    assert fit is not None and abs(fit.ceiling - 0.8) < 0.05
    ols = fit_entropy_law(hs, rewards, iterations=0)
    assert ols is not None and abs(ols.ceiling - 0.8) > abs(fit.ceiling - 0.8)


def test_tracker_stays_bounded_and_accurate() -> None:
    rng = random.Random(3)
    tracker = EntropyLawTracker(max_points=32)
    for step, h, r in law_run(1000, rng, noise=0.05, tau=300.0):
        tracker.update(step, h, r)
    assert len(tracker._points) <= 32 and tracker.records == 1000
    fit = tracker.fit
    assert fit is not None and fit.valid and fit.n >= 980  # refits every ~2% of the records
    assert abs(fit.ceiling - 0.8) < 0.01 and abs(fit.a - A) < 0.01
    progress = tracker.progress
    assert progress is not None and 0.9 < progress <= 1.05  # entropy mostly spent
    assert tracker.update(1001, math.nan, 0.5) is None  # non-finite input ignored


def test_exhaustion_fires_before_the_reward_saturates() -> None:
    rng = random.Random(11)
    run = law_run(400, rng, noise=0.03, tau=100.0)
    final = sum(r for _, _, r in run[-20:]) / 20
    start = sum(r for _, _, r in run[:20]) / 20
    # first step where the smoothed reward reaches 95% of its final value
    window = 10
    smoothed = [sum(r for _, _, r in run[i - window : i]) / window for i in range(window, 400)]
    saturation = window + next(
        i for i, v in enumerate(smoothed) if v >= start + 0.95 * (final - start)
    )
    det = EntropyExhaustion()
    fired = [
        t
        for step, h, r in run
        if (t := det.update(Observation(step, 0.0, reward_mean=r, policy_entropy_mean=h)))
    ]
    assert fired and fired[0].firing
    first = fired[0]
    assert first.step < saturation, (first.step, saturation)
    assert first.values["ceiling"] == pytest.approx(0.8, abs=3 * first.values["ceiling_stderr"])
    assert "ceiling" in first.message and first.reason.value == "ceiling_near"


def test_exhaustion_quiet_on_a_healthy_rl_run_and_recovers() -> None:
    rng = random.Random(5)
    det = EntropyExhaustion(ExhaustionConfig(sustain=2))
    # healthy: entropy stays high (noise only), reward noisy around a level
    for step in range(2000):
        h = 1.2 + rng.gauss(0.0, 0.05)
        assert det.update(Observation(step, 0.0, reward_mean=0.4 + rng.gauss(0, 0.05),
                                      policy_entropy_mean=h)) is None  # fmt: skip
    # a run that exhausts entropy and then holds it: the alert ends once entropy stops falling
    det = EntropyExhaustion(ExhaustionConfig(sustain=2))
    transitions = []
    for step in range(600):
        h = max(0.3, 1.5 - step / 150) + rng.gauss(0.0, 0.01)
        r = -A * math.exp(h) + B + rng.gauss(0.0, 0.02)
        t = det.update(Observation(step, 0.0, reward_mean=r, policy_entropy_mean=h))
        if t is not None:
            transitions.append(t)
    assert [t.firing for t in transitions] == [True, False]


def test_exhaustion_quiet_on_a_long_plateau_with_a_wandering_entropy() -> None:
    """A long healthy RL-like stream (the detection benchmark's synthetic law: the reward near
    its ceiling, the policy entropy heavy-tailed and wandering): at most one alert per 10,000
    records. A 40-record slope, the former default, read its wander as a fall 42 times."""
    run = synthetic_healthy(30_000, "syn-rl", np.random.default_rng(1))

    def starts(config: ExhaustionConfig) -> int:
        det = EntropyExhaustion(config)
        return sum(
            bool(t and t.firing)
            for r in run.records
            if (t := det.update(Observation(int(r["step"] or 0), 0.0, reward_mean=r["reward_mean"],
                                            policy_entropy_mean=r["policy_entropy_mean"])))
        )  # fmt: skip

    assert starts(ExhaustionConfig()) <= 3
    assert starts(ExhaustionConfig(trend_window=40, min_drop=0.02)) >= 10


def test_detectors_follow_the_run_kind() -> None:
    def names(kind: str) -> set[str]:
        # the training-health detectors judge every kind (test_detectors.py)
        return {type(d).__name__ for d in RunDetectors(AlertsConfig(), kind).detectors} - {
            "NonFiniteTraining",
            "LossSpike",
            "GradNormSpike",
            "RewardCollapse",
            "EntropySurge",
            "KLSurge",
            "LengthDrift",
        }

    assert names("sft") == {"InversionWeakening", "InversionLost"}
    assert names("rl") == {
        "InversionWeakening",
        "InversionLost",
        "EntropyCollapse",
        "EntropyExhaustion",
    }
    assert names("custom") == {"InversionWeakening", "InversionLost", "EntropyCollapse"}
    assert "EntropyExhaustion" in names("")
    judged = AlertsConfig.model_validate({"entropy": {"kinds": ["sft"]}})
    assert "EntropyCollapse" in {type(d).__name__ for d in RunDetectors(judged, "sft").detectors}


def test_entropy_collapse_reads_the_policy_entropy_of_rl_records() -> None:
    """Probe entropy flat, policy entropy collapsing: an RL run's collapse is seen."""
    from inversion_monitor.server.detectors import EntropyCollapse, EntropyConfig

    det = EntropyCollapse(EntropyConfig(warmup=5, sustain=2, smoothing=1.0))
    fired = [
        t
        for step in range(40)
        if (
            t := det.update(
                Observation(
                    step,
                    0.0,
                    entropy_mean=2.0,
                    policy_entropy_mean=1.5 if step < 10 else 0.3,
                )
            )
        )
    ]
    assert [t.firing for t in fired] == [True]
    assert fired[0].values["entropy_ewma"] == pytest.approx(0.3)
