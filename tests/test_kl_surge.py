"""KLSurge (RL): a lone KL record is quiet, a sustained surge is caught on its second record;
the warm-up starts once the policy leaves its reference."""

from __future__ import annotations

from inversion_monitor.server.detectors import AlertsConfig, KLSurge
from tests.health_streams import GRPO_KL_JUMP, firings, lognormal


def test_kl_lone_spike_is_quiet_and_a_sustained_surge_is_caught() -> None:
    """Healthy RL runs of the failure corpus show lone KL records up to 7x their level and a
    KL that keeps growing (here doubling over 40 steps); a learning-rate jump keeps it 5x up."""
    for seed in range(20):
        base = lognormal(0.8, 0.2, 40, seed)
        assert firings(KLSurge(AlertsConfig().kl_surge), "kl", [*base, 5.6, *base[:10]]) == []
        ramp = lognormal(0.8, 0.2, 60, seed + 1)
        growing = base + [v * (1.0 + min(1.0, (i + 1) / 40)) for i, v in enumerate(ramp)]
        assert firings(KLSurge(AlertsConfig().kl_surge), "kl", growing) == []
        surge = base + lognormal(4.0, 0.2, 10, seed + 2)
        fired = firings(KLSurge(AlertsConfig().kl_surge), "kl", surge)
        assert fired and 40 <= fired[0] <= 43, (seed, fired)


def test_kl_jump_fires_on_its_second_record() -> None:
    """Two records in a row far out fire on the second, though the first alone kept the CUSUM
    under the threshold (with each record over it, the alert came a record later)."""
    first = GRPO_KL_JUMP.index(4.922)
    config = AlertsConfig().kl_surge
    assert firings(KLSurge(config), "kl", GRPO_KL_JUMP) == [first + 1]
    each_over = config.model_copy(update={"confirm_z": None})
    assert firings(KLSurge(each_over), "kl", GRPO_KL_JUMP) == [first + 2]
    # the first record alone, back to the level after it: quiet
    lone = [*GRPO_KL_JUMP[: first + 1], *GRPO_KL_JUMP[first - 6 : first]]
    assert firings(KLSurge(config), "kl", lone) == []


def test_kl_warmup_starts_once_the_policy_moves() -> None:
    """A TRL run whose first steps have all advantages 0 logs KL = 0 exactly until the policy
    moves: those records set no level (else any KL afterwards is a surge from ~0)."""
    for seed in range(20):
        kls = [0.0] * 10 + lognormal(0.1, 0.3, 40, seed)
        assert firings(KLSurge(AlertsConfig().kl_surge), "kl", kls) == [], seed
