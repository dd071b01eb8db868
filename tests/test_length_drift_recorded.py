"""LengthDrift on a stream recorded in the failure corpus (benchmarks/failure_corpus.py)."""

from __future__ import annotations

from inversion_monitor.server.detectors import AlertsConfig, LengthDrift, Observation

# rl-length_hack-s0 of the corpus built on a second machine, steps 1-34: from step 25 the
# reward pays for length. The reward doubles at once; the length reaches 1.35 x and 1.28 x
# its level (robust z +2.4, +1.7) on steps 29 and 30, 1.5 x only on step 31.
HACK_LENGTHS = [
    42.19, 38.88, 44.38, 45.88, 34.06, 40.81, 33.19, 31.19, 28.69, 28.94, 38.69, 45.12,
    37.31, 38.75, 32.75, 35.5, 41.38, 31.0, 34.81, 33.44, 36.81, 33.0, 35.25, 36.81,
    29.5, 26.19, 36.25, 42.12, 48.75, 46.75, 54.81, 64.0, 62.94, 64.0,
]  # fmt: skip
HACK_REWARDS = [
    0.233, 0.222, 0.209, 0.218, 0.213, 0.215, 0.24, 0.227, 0.239, 0.231, 0.231, 0.217,
    0.22, 0.223, 0.225, 0.221, 0.196, 0.214, 0.214, 0.21, 0.206, 0.223, 0.231, 0.19,
    0.461, 0.409, 0.566, 0.658, 0.762, 0.73, 0.856, 1.0, 0.983, 1.0,
]  # fmt: skip
ONSET = 25


def first_alert(det: LengthDrift) -> int | None:
    for step, (n, r) in enumerate(zip(HACK_LENGTHS, HACK_REWARDS, strict=True), start=1):
        t = det.update(Observation(step, float(step), completion_length_mean=n, reward_mean=r))
        if t is not None and t.firing:
            return step
    return None


def test_the_recorded_length_hack_is_caught_within_its_budget() -> None:
    """Five records after the onset (the budget), on the length's second record 1.5 robust SDs
    and 1.2 x up with the reward far up; two robust SDs (the former ``length_z``) waited for
    the length's 1.5 x, seven records after."""
    config = AlertsConfig().length_drift
    assert first_alert(LengthDrift(config)) == ONSET + 5
    strict = config.with_reward.model_copy(update={"length_z": 2.0})
    assert first_alert(LengthDrift(config.model_copy(update={"with_reward": strict}))) == ONSET + 7
