"""The probe schedule: fixed steps, and the wall-time budget it promises."""

from __future__ import annotations

import pytest

from inversion_monitor.engine.schedule import ProbeSchedule


def simulate(budget: float, step_s: float, probe_s: float, steps: int) -> ProbeSchedule:
    schedule, clock = ProbeSchedule(overhead_budget=budget), 0.0
    schedule.start(now=clock)
    for step in range(1, steps + 1):
        clock += step_s
        if schedule.should_probe(step):
            clock += probe_s
            schedule.probe_done(seconds=probe_s)
        schedule.step_ended(now=clock)
    return schedule


@pytest.mark.parametrize("budget", [0.01, 0.03, 0.1, 0.5])
@pytest.mark.parametrize(("step_s", "probe_s"), [(0.2, 0.05), (0.1, 1.0), (1.0, 0.01)])
def test_budget_is_honoured_within_a_percentage_point(budget, step_s, probe_s):
    schedule = simulate(budget, step_s, probe_s, steps=20_000)
    # the budget is a ceiling: at most one probe per step
    every_step = probe_s / (step_s + probe_s)
    assert schedule.overhead == pytest.approx(min(budget, every_step), abs=0.01)


def test_a_long_pause_does_not_cause_a_burst():
    schedule, clock = ProbeSchedule(overhead_budget=0.05), 0.0
    schedule.start(now=clock)
    probed = []
    for step in range(1, 200):
        clock += 1000.0 if step == 100 else 0.1  # an evaluation pause at step 100
        if schedule.should_probe(step):
            probed.append(step)
            schedule.probe_done(seconds=0.1)
        schedule.step_ended(now=clock)
    after = [s for s in probed if 100 <= s < 120]
    assert len(after) <= 2


def test_every_n_steps_and_first_step():
    schedule = ProbeSchedule(every_n_steps=4, first_step=5)
    assert [s for s in range(1, 17) if schedule.should_probe(s)] == [8, 12, 16]


def test_state_round_trip():
    schedule = simulate(0.1, 0.5, 0.2, steps=7)
    restored = ProbeSchedule(overhead_budget=0.1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.credit_s == schedule.credit_s
    assert restored.expected_cost_s == schedule.expected_cost_s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, r"every_n_steps: Input should be greater than or equal to 1"),
        ({"overhead_budget": 0.0}, r"overhead_budget: Input should be greater than 0 \(got 0.0\)"),
        ({"overhead_budget": 1.5}, r"overhead_budget: Input should be less than 1 \(got 1.5\)"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbeSchedule(**kwargs)
