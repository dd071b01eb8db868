"""EntropyCollapse's fast path (RL policy entropy): a sudden drop within three records,
quiet on healthy RL runs and absent on SFT; the alert gives the level the fall was judged
against."""

from __future__ import annotations

import math
import random

import pytest

from inversion_monitor.server.detectors import (
    AlertsConfig,
    EntropyCollapse,
    Observation,
    RunDetectors,
)
from tests.health_streams import firings, lognormal


def test_entropy_collapse_fast_path_within_three_records() -> None:
    """The demo's failure: policy entropy steady, then doubling for a record, then ~0."""
    for seed in range(20):
        hs = [*lognormal(1.0, 0.05, 20, seed), 2.0, 0.3, 0.02, 0.01, 0.01]
        fired = firings(EntropyCollapse(AlertsConfig().entropy), "policy_entropy_mean", hs)
        assert fired and 20 <= fired[0] <= 23, (seed, fired)
        # a halving, no spike
        hs = lognormal(1.0, 0.05, 30, seed) + lognormal(0.5, 0.05, 10, seed + 1)
        fired = firings(EntropyCollapse(AlertsConfig().entropy), "policy_entropy_mean", hs)
        assert fired and 30 <= fired[0] <= 33, (seed, fired)


def test_entropy_fast_path_quiet_on_healthy_rl_and_absent_on_sft() -> None:
    # RL policy entropy declining slowly as the policy sharpens (1.5 -> 0.3 nats)
    rng = random.Random(3)
    hs = [0.3 + 1.2 * math.exp(-s / 2000) * math.exp(rng.gauss(0, 0.04)) for s in range(10_000)]
    assert len(firings(EntropyCollapse(AlertsConfig().entropy), "policy_entropy_mean", hs)) <= 1
    assert "EntropyCollapse" not in {
        type(d).__name__ for d in RunDetectors(AlertsConfig(), "sft").detectors
    }


def test_policy_entropy_halving_fires_on_its_record() -> None:
    """A policy entropy that halves (0.56 x its level with the record's noise) fires on that
    record; the failure corpus' lowest healthy record (0.63 x) does not."""
    for seed in range(20):
        base = lognormal(1.2, 0.04, 40, seed)
        level = sorted(base)[20]
        fired = firings(
            EntropyCollapse(AlertsConfig().entropy), "policy_entropy_mean", [*base, 0.57 * level]
        )
        assert fired == [40], (seed, fired)
        fired = firings(
            EntropyCollapse(AlertsConfig().entropy),
            "policy_entropy_mean",
            [*base, 0.65 * level, *lognormal(1.2, 0.04, 10, seed + 1)],
        )
        assert fired == [], (seed, fired)


def test_the_alert_gives_the_level_the_fall_was_judged_against() -> None:
    """Forty records at 1.00 and 1.10 nats, then 0.2: judged against the median of
    log(h + 0.01) over the forty (1.049 nats, the floor taken out), the level the message and
    ``sudden_level`` give; the window's median after the fall was pushed (1.000) is not it."""
    det = EntropyCollapse(AlertsConfig().entropy)
    values = [1.0, 1.1] * 20 + [0.2]
    fired = [
        t
        for step, h in enumerate(values)
        if (t := det.update(Observation(step, float(step), policy_entropy_mean=h))) is not None
    ]
    assert [t.step for t in fired] == [40]
    judged = math.sqrt(1.01 * 1.11) - 0.01
    assert fired[0].values["sudden_level"] == pytest.approx(judged, rel=1e-12)
    assert f"fell suddenly from its level {judged:.3f} (0.19 x its level" in fired[0].message
