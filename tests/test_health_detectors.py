"""The training-health detectors together: NonFiniteTraining, every drift detector on seeded
synthetic streams (quiet when healthy, a step change within its budget), what healthy runs of
the failure corpus do, and the alert engine on records as the server stores them. Each
detector's own shapes: test_reward_collapse, test_grad_norm_spike, test_kl_surge,
test_length_drift, test_entropy_collapse_fast_path."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.alerts import AlertEngine
from inversion_monitor.server.detectors import (
    AlertsConfig,
    EntropyCollapse,
    EntropySurge,
    GradNormSpike,
    KLSurge,
    LengthDrift,
    LossSpike,
    NonFiniteTraining,
    Observation,
    Reason,
    RewardCollapse,
    Transition,
)
from inversion_monitor.server.record_values import read_values
from tests.health_streams import (
    GRPO_ENTROPY_RISE,
    GRPO_ENTROPY_SAG,
    GRPO_KL_CLIMB,
    GRPO_LENGTH_WANDER,
    GRPO_REWARD_DIP,
    GRPO_SIGNED_LOSS,
    Detector,
    firings,
    lognormal,
)

CASES: list[tuple[Callable[[], Detector], str, float, float, float, int]] = [
    # detector, field, healthy level, healthy sd (log or linear), faulty level, budget
    (lambda: LossSpike(AlertsConfig().loss_spike), "loss", 2.0, 0.05, 3.0, 3),
    (lambda: GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", 1.0, 0.15, 4.0, 3),
    (lambda: KLSurge(AlertsConfig().kl_surge), "kl", 0.05, 0.15, 0.3, 3),
    (lambda: EntropySurge(AlertsConfig().entropy_surge), "policy_entropy_mean", 1.0, 0.05, 2.0, 3),
    # LengthDrift's length-alone path waits for twenty records: healthy GRPO runs of the
    # failure corpus wandered to 1.5-1.9x their level, or fell to 0.4x, for up to ~18 (a
    # collapse to empty completions fires at once; a length hack is caught by the reward
    # rising with it)
    (lambda: LengthDrift(AlertsConfig().length_drift), "completion_length_mean", 40, 0.08, 80, 20),
    (lambda: LengthDrift(AlertsConfig().length_drift), "completion_length_mean", 40, 0.08, 12, 20),
    (lambda: LengthDrift(AlertsConfig().length_drift), "completion_length_mean", 40, 0.08, 4, 0),
]


@pytest.mark.parametrize(
    "bad",
    [
        {"loss": math.nan},
        {"grad_norm": math.inf},
        {"reward_mean": -math.inf},
        {"loss": 2.0, "nonfinite_fields": ("loss",)},  # a reader that dropped the value
    ],
)
def test_nonfinite_fires_on_that_very_record(bad: dict[str, object]) -> None:
    det = NonFiniteTraining()
    for step in range(5):
        assert det.update(Observation(step, 0.0, loss=2.0, grad_norm=1.0)) is None
    t = det.update(Observation(5, 5.0, **bad))  # type: ignore[arg-type]
    assert t is not None and t.firing and t.step == 5 and t.reason is Reason.NON_FINITE
    assert t.severity.value == "critical"
    # stays active (no second alert) while it lasts, ends after `recover` finite records
    assert det.update(Observation(6, 6.0, loss=math.nan)) is None
    ends = [
        t
        for s in range(7, 40)
        if (t := det.update(Observation(s, float(s), loss=2.0, grad_norm=1.0)))
    ]
    assert [(t.firing, t.step) for t in ends] == [(False, 6 + 20)]


def test_nonfinite_ignores_fields_it_does_not_watch_and_missing_values() -> None:
    det = NonFiniteTraining()
    assert det.update(Observation(1, 0.0, kl=math.nan, nonfinite_fields=("kl",))) is None
    assert det.update(Observation(2, 0.0)) is None


@pytest.mark.parametrize("make, field, level, sd, faulty, budget", CASES)
def test_quiet_on_healthy_streams(
    make: Callable[[], Detector], field: str, level: float, sd: float, faulty: float, budget: int
) -> None:
    """10,000 healthy records (log-normal noise around a level): at most one alert (the goal)."""
    assert len(firings(make(), field, lognormal(level, sd, 10_000, seed=1))) <= 1


@pytest.mark.parametrize("make, field, level, sd, faulty, budget", CASES)
def test_step_change_caught_within_budget(
    make: Callable[[], Detector], field: str, level: float, sd: float, faulty: float, budget: int
) -> None:
    for seed in range(20):
        values = lognormal(level, sd, 60, seed) + lognormal(faulty, sd, 30, seed + 100)
        fired = firings(make(), field, values)
        assert fired and 60 <= fired[0] <= 60 + budget, (seed, fired)


def test_drift_alert_ends_when_the_value_is_back() -> None:
    det = GradNormSpike(AlertsConfig().grad_norm_spike)
    values = [*lognormal(1.0, 0.1, 30, 0), 20.0, 18.0, *lognormal(1.0, 0.1, 60, 1)]
    ts: list[Transition] = [
        t for s, v in enumerate(values) if (t := det.update(Observation(s, 0.0, grad_norm=v)))
    ]
    assert (ts[0].firing, ts[0].step) == (True, 31)
    assert len(ts) == 2 and not ts[1].firing and ts[1].reason is Reason.RECOVERED
    assert ts[1].step <= 31 + 20


def test_signed_loss_is_taken_as_is() -> None:
    """An RL policy loss hovers around 0 and may be negative: scored linearly, not as a log."""
    rng = random.Random(0)
    losses = [rng.gauss(0.0, 0.01) for _ in range(2000)]
    det = LossSpike(AlertsConfig().loss_spike)
    assert firings(det, "loss", losses) == []
    assert det.stream.log is False


def test_engine_alerts_on_a_nan_grad_norm_record() -> None:
    engine = AlertEngine(AlertsConfig())
    for step in range(1, 6):
        rec = monitor_pb2.StepRecord(run_id="r", step=step, loss=2.0, grad_norm=1.0)
        engine.on_record("r", "demo", rec)
    bad = monitor_pb2.StepRecord(run_id="r", step=6, loss=2.0, grad_norm=math.nan)
    bad.nonfinite_fields.append("grad_norm")
    assert math.isnan(read_values(bad).grad_norm or 0.0)
    engine.on_record("r", "demo", bad)
    (alert,) = engine.active("r")
    assert (alert.name, alert.severity, alert.start_step) == ("NonFiniteTraining", "critical", 6)


def test_mad_matches_sorting() -> None:
    """The O(log n) MAD of the window equals the MAD by sorting the deviations."""
    from inversion_monitor.server.detectors.robust import _mad, _median

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 70)
        ys = sorted(rng.choice([rng.gauss(0, 1), float(rng.randint(-3, 3))]) for _ in range(n))
        med = _median(ys)
        assert _mad(ys, med) == pytest.approx(_median(sorted(abs(y - med) for y in ys)))


def test_confirm_z_counts_records_out_on_a_downward_side_too() -> None:
    """``confirm_z`` is a knob of every drift detector: on a fall (LengthDrift at 0.35-0.37x, above
    its one-record collapse gates) the records before the CUSUM passes the threshold count
    toward ``confirm`` 2, so the alert comes on the record it passes, not on the next one."""
    lengths = [*lognormal(40.0, 0.05, 30, 7), *[14.0] * 26]
    base = AlertsConfig().length_drift.model_copy(update={"confirm": 2})
    each_over = firings(LengthDrift(base), "completion_length_mean", lengths)
    counted = firings(
        LengthDrift(base.model_copy(update={"confirm_z": 2.5})), "completion_length_mean", lengths
    )
    passes = firings(LengthDrift(AlertsConfig().length_drift), "completion_length_mean", lengths)
    assert counted == passes and each_over == [passes[0] + 1], (counted, each_over, passes)


def test_ratio_gates_need_a_log_stream() -> None:
    with pytest.raises(ValidationError, match="min_rise and min_fall are ratios to the level"):
        AlertsConfig.model_validate({"reward_collapse": {"min_fall": 0.5}})
    assert AlertsConfig.model_validate({"kl_surge": {"min_rise": 0.0}}).kl_surge.min_rise == 0.0


def test_healthy_grpo_reward_dip_and_length_wander_are_quiet() -> None:
    """Real healthy wander of the GRPO loop stays quiet with the defaults; the former settings
    (RewardCollapse allowance 1.5, LengthDrift threshold 16) alerted on the first."""
    config = AlertsConfig()
    assert firings(RewardCollapse(config.reward_collapse), "reward_mean", GRPO_REWARD_DIP) == []
    former = config.reward_collapse.model_copy(update={"k": 1.5, "z_cap": 10.0})
    assert firings(RewardCollapse(former), "reward_mean", GRPO_REWARD_DIP) != []
    length = LengthDrift(config.length_drift)
    assert firings(length, "completion_length_mean", GRPO_LENGTH_WANDER) == []
    # the wander's CUSUM peaks at ~19, over the former threshold 16, under 24 (twelve records)
    stream = LengthDrift(config.length_drift).stream
    peak = max(s.up for v in GRPO_LENGTH_WANDER if (s := stream.update(v)) is not None)
    assert 16.0 < peak < config.length_drift.threshold


def test_a_slow_healthy_drift_then_a_lone_record_is_quiet() -> None:
    """A drift the 64-record level lags charges the CUSUM; a lone record past the ratio gate
    then fired. ``confirm`` (two records in a row) and the gates keep these corpus runs quiet,
    while the same drift followed by a sustained surge or fall still fires on its second record."""
    config = AlertsConfig()
    assert firings(KLSurge(config.kl_surge), "kl", GRPO_KL_CLIMB) == []
    assert (
        firings(EntropySurge(config.entropy_surge), "policy_entropy_mean", GRPO_ENTROPY_RISE) == []
    )
    sag = firings(EntropyCollapse(config.entropy), "policy_entropy_mean", GRPO_ENTROPY_SAG)
    assert sag == []
    n = len(GRPO_KL_CLIMB)
    assert firings(KLSurge(config.kl_surge), "kl", [*GRPO_KL_CLIMB, 6.0, 7.0])[:1] == [n + 1]
    level = 1.35
    fell = firings(
        EntropyCollapse(config.entropy), "policy_entropy_mean", [*GRPO_ENTROPY_SAG, 0.01]
    )
    assert fell[:1] == [len(GRPO_ENTROPY_SAG)]  # a fall to ~0 still fires on its record
    assert firings(
        EntropySurge(config.entropy_surge), "policy_entropy_mean", [*GRPO_ENTROPY_RISE, 2.2 * level]
    )[:1] == [len(GRPO_ENTROPY_RISE)]


def test_a_signed_policy_loss_fires_on_a_sustained_shift_only() -> None:
    """A GRPO policy loss (-advantage x ratio + beta KL) hovers at 0 in two clusters whose
    robust SD understates its spread: a lone record 13 robust SDs up (rl-healthy-s69, with a
    20x grad-norm spike) is quiet; a shift that stays fires on its third record; a positive
    loss still fires on one record."""
    head = GRPO_SIGNED_LOSS[:20]
    det = LossSpike(AlertsConfig().loss_spike)
    assert firings(det, "loss", [*head, 0.79, 0.03, -0.05, 0.02, -0.04]) == []
    assert det.stream.log is False and det.config.z_cap == 6.0
    shifted = firings(LossSpike(AlertsConfig().loss_spike), "loss", [*head, *[0.4] * 5])
    assert shifted[:1] == [len(head) + 2]
    positive = lognormal(2.0, 0.05, 30, seed=0)
    assert firings(LossSpike(AlertsConfig().loss_spike), "loss", [*positive, 6.0]) == [30]


def test_messages_give_the_level_in_the_values_own_units() -> None:
    """A log stream with a floor scores ``value + floor`` (KL + 0.01, a length + 1 token); the
    alert's level and ratio are the value's own: a KL level of 0.005 reads 0.005, not 0.015."""
    kl = [*lognormal(0.005, 0.15, 40, 3), 0.5, 0.5]
    det = KLSurge(AlertsConfig().kl_surge)
    fired = [t for s, v in enumerate(kl) if (t := det.update(Observation(s, 0.0, kl=v)))]
    assert fired and fired[0].firing
    level = fired[0].values["level"]
    assert 0.004 < level < 0.006, level
    assert f"KL 0.5 is {0.5 / level:.0f} x its level {level:.4g}" in fired[0].message
