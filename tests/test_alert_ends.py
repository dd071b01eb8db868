"""When a training-health alert ends: when the value is back at the level it left, not when
the fault has become the run's level (the demo's destabilised run read "Reward collapse
resolved" at step 44 with its reward still at 0.006, a thirtieth of the level it left)."""

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
from inversion_monitor.server.detectors.entropy import EntropyConfig
from tests.health_streams import DEMO_UNSTABLE_REWARD

LEVELS = {
    "loss": 2.0,
    "grad_norm": 1.0,
    "reward_mean": 0.4,
    "policy_entropy_mean": 0.8,
    "kl": 0.02,
    "completion_length_mean": 40.0,
}
# a fault per alert: the field and the value it takes (every other field stays healthy)
FAULTS = [
    ("RewardCollapse", "reward_mean", 0.01),
    ("KLSurge", "kl", 0.4),
    ("EntropyCollapse", "policy_entropy_mean", 0.1),
    ("EntropySurge", "policy_entropy_mean", 2.0),
    ("LossSpike", "loss", 6.0),
    ("GradNormSpike", "grad_norm", 8.0),
    ("LengthDrift", "completion_length_mean", 2.0),
    ("LengthDrift", "completion_length_mean", 200.0),
]


def _alerts(
    field: str, fault: float, fault_records: int, seed: int = 0
) -> list[tuple[str, bool, int]]:
    """An RL run at its levels for 40 records, ``field`` at ``fault`` for ``fault_records``,
    then at its level again until record 340: the transitions (name, firing, records after
    the onset)."""
    rng = random.Random(seed)
    dets = RunDetectors(AlertsConfig(), "rl")
    out = []
    for step in range(340):
        values = {
            name: (level + rng.gauss(0.0, 0.02))
            if name == "reward_mean"
            else level * math.exp(rng.gauss(0.0, 0.05))
            for name, level in LEVELS.items()
        }
        if 40 <= step < 40 + fault_records:
            values[field] = fault * math.exp(rng.gauss(0.0, 0.05))
        obs = Observation(step, float(step), **values)  # type: ignore[arg-type]
        out += [(t.name.value, t.firing, step - 40) for t in dets.update(obs)]
    return out


@pytest.mark.parametrize("alert, field, fault", FAULTS)
def test_an_alert_stays_on_while_its_fault_lasts(alert: str, field: str, fault: float) -> None:
    """300 records of the fault: the alert fires within 20 records and never ends (before,
    every one of these ended 60-220 records in, the fault's records having become the level)."""
    transitions = _alerts(field, fault, 300)
    assert [(n, f) for n, f, _ in transitions] == [(alert, True)], transitions
    assert transitions[0][2] <= 20


@pytest.mark.parametrize("alert, field, fault", FAULTS)
def test_an_alert_ends_soon_after_its_fault_does(alert: str, field: str, fault: float) -> None:
    """30 records of the fault, then the level again: the alert ends within 12 records of the
    return (a CUSUM at its bound falls by the allowance a record, 80 records for LengthDrift's;
    ten records in a row within 2 robust SDs of the level it left end it sooner), and nothing
    else fires (an entropy back at its level after a surge read "falling fast" ~70 records
    later, its fall counted from the surge)."""
    transitions = _alerts(field, fault, 30)
    assert [(n, f) for n, f, _ in transitions] == [(alert, True), (alert, False)], transitions
    assert 30 <= transitions[1][2] <= 30 + 12


def test_the_demo_reward_collapse_stays_on_until_the_reward_is_back() -> None:
    """The demo's destabilised run (recorded): the reward at ~0 from step 21 to its end (step
    49) holds the alert, which ends on the first record of the run played again (0.254) and
    fires again on its collapse."""
    dets = RunDetectors(AlertsConfig(), "rl")
    rewards = DEMO_UNSTABLE_REWARD + DEMO_UNSTABLE_REWARD
    n = len(DEMO_UNSTABLE_REWARD)
    out = []
    for step, r in enumerate(rewards):
        obs = Observation(step, float(step), reward_mean=r)
        out += [(t.firing, step) for t in dets.update(obs)]
    assert out == [(True, 23), (False, n + 1), (True, n + 23)]
    assert max(rewards[23:n]) < 0.01


@pytest.mark.parametrize("start", [40, 1200])
def test_entropy_back_from_a_surge_has_not_fallen(start: int) -> None:
    """An entropy surging to 2.5 x for 50 records and back is no collapse. Within the first
    ``horizon`` (1,000) steps the rate rule counts a fall from the level at most (it fired
    ~70 records after the surge, the fall counted from its peak); past them the level judged
    against is the median of the last 1,000 steps' stretches, not their highest (it fired at
    once, "below half its highest", and stayed on while the surge was in the window)."""
    det = EntropyCollapse(EntropyConfig())
    rng = random.Random(3)
    fired = []
    for step in range(start + 400):
        h = 0.8 * math.exp(rng.gauss(0.0, 0.03)) * (2.5 if start <= step < start + 50 else 1.0)
        t = det.update(Observation(step, float(step), policy_entropy_mean=h))
        if t is not None and t.firing:
            fired.append(step)
    assert fired == []
