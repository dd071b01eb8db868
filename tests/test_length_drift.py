"""LengthDrift (RL): a healthy wander is quiet; a length running away or collapsing, or rising
with the reward (a reward that pays for length), is caught; the recorded length hack of the
failure corpus (benchmarks/failure_corpus.py)."""

from __future__ import annotations

import random

from inversion_monitor.server.detectors import AlertsConfig, LengthDrift, Observation
from tests.health_streams import firings, lognormal


def joint_firings(det: LengthDrift, lengths: list[float], rewards: list[float]) -> list[int]:
    out = []
    for step, (n, r) in enumerate(zip(lengths, rewards, strict=True)):
        t = det.update(Observation(step, float(step), completion_length_mean=n, reward_mean=r))
        if t is not None and t.firing:
            out.append(step)
    return out


def _first_message(lengths: list[float], rewards: list[float]) -> str:
    det = LengthDrift(AlertsConfig().length_drift)
    for step, (n, r) in enumerate(zip(lengths, rewards, strict=True)):
        t = det.update(Observation(step, float(step), completion_length_mean=n, reward_mean=r))
        if t is not None and t.firing:
            return t.message
    return ""


def test_length_wander_is_quiet_and_running_away_is_caught() -> None:
    """Healthy RL runs of the failure corpus: a mean length halved for ten steps, or at 1.8x
    its level for five (and 1.5-1.8x, or 0.4x, for up to ~18); a length doubled (to the token
    cap) that stays is caught by the length alone within twenty records (a length hack sooner,
    by the reward rising with it)."""
    for seed in range(20):
        base = lognormal(40, 0.08, 30, seed)
        dip = base + lognormal(20, 0.08, 10, seed + 1) + lognormal(40, 0.08, 20, seed + 2)
        config = AlertsConfig().length_drift
        assert firings(LengthDrift(config), "completion_length_mean", dip) == []
        bump = base + lognormal(72, 0.08, 5, seed + 1) + lognormal(40, 0.08, 20, seed + 2)
        assert firings(LengthDrift(config), "completion_length_mean", bump) == []
        # the second build's healthy wanders: ~1.7x its level for fifteen records (which fired
        # the former threshold of 24)
        wander = base + lognormal(68.0, 0.08, 15, seed + 4) + lognormal(40, 0.08, 20, 9)
        assert firings(LengthDrift(config), "completion_length_mean", wander) == []
        former = config.model_copy(update={"threshold": 24.0})
        assert firings(LengthDrift(former), "completion_length_mean", wander), seed
        hack = base + lognormal(80, 0.08, 30, seed + 3)
        fired = firings(LengthDrift(config), "completion_length_mean", hack)
        assert fired and 30 <= fired[0] <= 52, (seed, fired)


def test_length_rising_with_the_reward_is_caught_within_five_records() -> None:
    """The failure corpus' length hack (GRPO loop, onset record 25): the reward leaps from
    ~0.21 to 0.44-0.88 at once while the length climbs 1.0, 1.2, 1.1, 1.4 x its level; the
    length alone needs eleven records (healthy runs wander to 1.8x), the two together five
    (two records in a row).
    A healthy bump of the length with a level reward, and a reward that rises (the policy
    learns) with a level length, stay quiet."""
    config = AlertsConfig().length_drift
    for seed in range(20):
        rng = random.Random(seed)
        level = [0.21 + rng.gauss(0.0, 0.015) for _ in range(25)]
        base = lognormal(34, 0.1, 25, seed)
        hack = [34 * f for f in (0.95, 1.0, 1.15, 1.1, 1.45, 1.45, 1.6, 1.6, 1.75, 1.9)]
        paid = [0.44, 0.53, 0.62, 0.58, 0.78, 0.78, 0.88, 0.84, 0.92, 0.87]
        fired = joint_firings(LengthDrift(config), base + hack, level + paid)
        assert fired and 25 <= fired[0] <= 30, (seed, fired)
        assert "reward may pay for length" in _first_message(base + hack, level + paid)
        bump = base + lognormal(64, 0.08, 5, seed + 1) + lognormal(34, 0.1, 20, seed + 2)
        flat = level + [0.21 + rng.gauss(0.0, 0.015) for _ in range(25)]
        assert joint_firings(LengthDrift(config), bump, flat) == [], seed
        learns = level + [0.21 + 0.03 * i for i in range(25)]
        steady = base + lognormal(34, 0.1, 25, seed + 3)
        assert joint_firings(LengthDrift(config), steady, learns) == [], seed


def test_length_halving_every_record_fires_on_the_second_halving() -> None:
    """A length halving on every record fires at 0.25 x its level (robust z ~-25), a record
    before the 0.25 x collapse rule, while a healthy halving that stays (0.5 x) is quiet."""
    for seed in range(20):
        base = lognormal(40, 0.06, 40, seed)
        collapse = base + [40 * 0.5**k for k in range(1, 6)]
        fired = firings(
            LengthDrift(AlertsConfig().length_drift), "completion_length_mean", collapse
        )
        assert fired and fired[0] == 41, (seed, fired)
        halved = base + lognormal(20, 0.06, 10, seed + 1)
        assert (
            firings(LengthDrift(AlertsConfig().length_drift), "completion_length_mean", halved)
            == []
        )


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
