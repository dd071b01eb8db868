"""RewardCollapse (RL): a collapse within five records, a slide on its first or second record,
quiet on lone dips, shallow falls and a rising reward; the demo's destabilised run."""

from __future__ import annotations

import math
import random

from inversion_monitor.server.detectors import (
    AlertsConfig,
    Observation,
    Reason,
    RewardCollapse,
    Transition,
)
from tests.health_streams import DEMO_HEALTHY_REWARD, DEMO_UNSTABLE_REWARD, firings

# a healthy reward around 0.305 (robust SD ~0.037), then a slide of 0.07, 0.165, 0.265 a record
SLIDE_BASE = [0.30, 0.34, 0.27, 0.31, 0.35, 0.29, 0.33, 0.28] * 8


def _transitions(det: RewardCollapse, rewards: list[float]) -> list[Transition]:
    out = []
    for step, r in enumerate(rewards, start=1):
        t = det.update(Observation(step, float(step), reward_mean=r))
        if t is not None:
            out.append(t)
    return out


def test_reward_collapse_within_five_records_and_quiet_while_the_reward_rises() -> None:
    rng = random.Random(0)
    rising = [0.2 + 0.5 * (1 - math.exp(-s / 200)) + rng.gauss(0, 0.04) for s in range(10_000)]
    assert len(firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", rising)) <= 1
    # the GRPO loop's learning-rate jump: 0.22 to 0.08, its records' noise ~0.016-0.02 (the
    # robust SD of its healthy reward; a fall of only ~4 robust SDs is as deep as a healthy
    # GRPO run's dip, tests below)
    for seed in range(20):
        rng = random.Random(seed)
        values = [0.22 + rng.gauss(0, 0.02) for _ in range(40)]
        values += [0.08 + rng.gauss(0, 0.02) for _ in range(20)]
        fired = firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", values)
        assert fired and 40 <= fired[0] <= 45, (seed, fired)
    # a broken reward function: 0 from step 40
    zeros = [0.4 + rng.gauss(0, 0.05) for _ in range(40)] + [0.0] * 10
    assert firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", zeros)[0] <= 42


def test_reward_slide_fires_on_its_second_record() -> None:
    """The synthetic reward_slide: the first record 2 robust SDs down, the second at 0.46 x
    and -4.5 (``slide_z``, the record before -2.0) fires there; without ``slide_z`` (the old
    code) only the third, where the static threshold and the running-mean rule fire on the
    second."""
    config = AlertsConfig().reward_collapse
    slide = [*SLIDE_BASE, 0.23, 0.14, 0.04, 0.0]
    assert firings(RewardCollapse(config), "reward_mean", slide) == [65]
    old = config.model_copy(update={"slide_z": None})
    assert firings(RewardCollapse(old), "reward_mean", slide) == [66]


def test_reward_lone_dip_or_shallow_fall_is_quiet() -> None:
    """The same second record after a record at the level (a lone dip), and a fall that stays
    above 0.5 x the level (a healthy GRPO dip), do not fire."""
    config = AlertsConfig().reward_collapse
    for tail in ([0.31, 0.14, 0.31, 0.30], [0.23, 0.19, 0.21, 0.2]):
        assert firings(RewardCollapse(config), "reward_mean", SLIDE_BASE + tail) == [], tail


def test_reward_collapse_on_the_demo_destabilised_run() -> None:
    """The demo's reward is noisy (robust SD ~0.09 around 0.25), so its fall to ~0 is ~2.7
    robust SDs a record: under the CUSUM's allowance of 2.5, it never fired. A reward that was
    never negative, at a quarter of its level or lower three records in a row, fires (step
    24, three records after the fall began at 22) and stays on while it stays there; the
    healthy twin, whose reward rises, stays quiet."""
    config = AlertsConfig().reward_collapse
    (fired,) = _transitions(RewardCollapse(config), DEMO_UNSTABLE_REWARD[:40])
    assert fired.firing and fired.step == 24 and fired.reason is Reason.FELL_BELOW_LEVEL
    assert "0.25 x its level or lower on 3 records in a row" in fired.message
    assert _transitions(RewardCollapse(config), DEMO_HEALTHY_REWARD) == []
    # a signed reward has no ratio to its level: only the CUSUM judges it
    signed = [r - 0.2 for r in DEMO_UNSTABLE_REWARD]
    assert _transitions(RewardCollapse(config), signed) == []
    off = AlertsConfig.model_validate({"reward_collapse": {"collapse": None}}).reward_collapse
    assert _transitions(RewardCollapse(off), DEMO_UNSTABLE_REWARD) == []


def test_reward_sliding_fires_on_its_first_record_at_half_its_level() -> None:
    """The synthetic reward slide (0.1 a record from ~0.3): its second record, under half the
    level and 5+ robust SDs below it, fires at once (the CUSUM waited a record more); a reward
    that goes below 0 on that record has fallen, it does not turn the run signed. A Gaussian
    reward whose noise is a fifth of its level (under half of it every few hundred records)
    stays quiet: at most 1 alert in 10,000 records."""
    for seed in range(20):
        rng = random.Random(seed)
        values = [0.3 + rng.gauss(0, 0.02) for _ in range(40)] + [0.2, 0.12, 0.02, 0.0]
        fired = firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", values)
        assert fired and fired[0] == 41, (seed, fired)
        values = [0.3 + rng.gauss(0, 0.02) for _ in range(40)] + [0.2, -0.05, -0.1, -0.1]
        fired = firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", values)
        assert fired and fired[0] == 41, (seed, fired)
    alerts = 0
    for seed in range(20):
        rng = random.Random(seed)
        noisy = [max(0.0, 0.25 + rng.gauss(0, 0.05)) for _ in range(500)]
        alerts += len(firings(RewardCollapse(AlertsConfig().reward_collapse), "reward_mean", noisy))
    assert alerts <= 1
