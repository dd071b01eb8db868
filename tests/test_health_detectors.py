"""The training-health detectors: NonFiniteTraining, the spikes and surges, RewardCollapse,
EntropyCollapse's fast path and LengthDrift, on seeded synthetic streams and through the
alert engine (records as the server stores them)."""

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
    RunDetectors,
    Transition,
)
from inversion_monitor.server.record_values import read_values

Detector = LossSpike | GradNormSpike | KLSurge | RewardCollapse | EntropySurge | LengthDrift


def lognormal(level: float, sd: float, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [level * math.exp(rng.gauss(0.0, sd)) for _ in range(steps)]


def firings(det: Detector | EntropyCollapse, field: str, values: list[float]) -> list[int]:
    out = []
    for step, v in enumerate(values):
        t = det.update(Observation(step, float(step), **{field: v}))  # type: ignore[arg-type]
        if t is not None and t.firing:
            out.append(step)
    return out


# ---------------------------------------------------------------- NonFiniteTraining


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


# ---------------------------------------------------------------- spikes and drifts


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


# a healthy reward around 0.305 (robust SD ~0.037), then a slide of 0.07, 0.165, 0.265 a record
SLIDE_BASE = [0.30, 0.34, 0.27, 0.31, 0.35, 0.29, 0.33, 0.28] * 8


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


def test_drift_alert_ends_when_the_value_is_back() -> None:
    det = GradNormSpike(AlertsConfig().grad_norm_spike)
    values = [*lognormal(1.0, 0.1, 30, 0), 20.0, 18.0, *lognormal(1.0, 0.1, 60, 1)]
    ts: list[Transition] = [
        t for s, v in enumerate(values) if (t := det.update(Observation(s, 0.0, grad_norm=v)))
    ]
    assert (ts[0].firing, ts[0].step) == (True, 31)
    assert len(ts) == 2 and not ts[1].firing and ts[1].reason is Reason.RECOVERED
    assert ts[1].step <= 31 + 20


def test_a_lone_grad_norm_record_never_fires_a_sustained_rise_does() -> None:
    """Healthy RL runs of the failure corpus (its build on a second machine) had lone records
    13x and 16x their level (robust z +13, +16), back at the level on the next record: quiet.
    A learning-rate jump keeps the grad norm up: 8x for good fires on its second or third
    record (two in a row over the threshold, each at 2x the level or more; the budget is
    three), 1.5x for good stays quiet (the loss, rising too, fires on the first: with_loss_z)."""
    for seed in range(20):
        base = lognormal(1.0, 0.2, 60, seed)
        for spike in (13.0, 16.0, 40.0):
            values = [*base[:40], spike, *base[40:]]
            assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values) == []
        jump = [*base[:40], *(8.0 * v for v in base[40:])]
        fired = firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", jump)
        assert fired[:1] in ([41], [42]), (seed, fired)
        drift = [*base[:40], *(1.5 * v for v in base[40:])]
        assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", drift) == []


def test_growing_grad_norm_spikes_fire_on_the_second_spike() -> None:
    """Spikes "higher and higher" (x3, then x4.5 four records later): the second fires though
    neither alone is out far enough for the CUSUM; either spike alone does not fire."""
    for seed in range(20):
        base = lognormal(1.0, 0.15, 64, seed)

        def run(first: float, second: float, base: list[float] = base) -> list[int]:
            values = list(base)
            values[40], values[44] = first, second
            return firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values)

        assert run(3.0, 4.5) == [44], seed
        assert run(3.0, 1.0) == [] and run(1.0, 3.0) == [], seed


def test_growing_grad_norm_spikes_fire_when_noise_shrinks_the_growth_to_1_25() -> None:
    """The synthetic benchmark's late trial (syn-grad_spikes_growing-t3): a first spike that
    noise took to 3.2x the level, then a second only 1.25 x it (x3 then x7 on noisy records);
    neither is out far enough for the CUSUM alone, the growth fires on the second spike (at
    1.3 x it fired only on the third, 8 records after the first)."""
    for seed in range(20):
        values = lognormal(1.0, 0.15, 64, seed)
        values[40], values[44] = 3.2, 4.0
        assert firings(GradNormSpike(AlertsConfig().grad_norm_spike), "grad_norm", values) == [
            44
        ], seed


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


def test_signed_loss_is_taken_as_is() -> None:
    """An RL policy loss hovers around 0 and may be negative: scored linearly, not as a log."""
    rng = random.Random(0)
    losses = [rng.gauss(0.0, 0.01) for _ in range(2000)]
    det = LossSpike(AlertsConfig().loss_spike)
    assert firings(det, "loss", losses) == []
    assert det.stream.log is False


# ---------------------------------------------------------------- through the engine


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


# ---------------------------------------------------------------- what healthy RL runs do


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


# KL of the failure corpus' rl-lr_jump-s0, steps 1-29: the learning rate jumps 300x at step 25;
# KL 4.92 (6.1 x its level, robust z +4.5: CUSUM 2.5, under the threshold) then 18.7
GRPO_KL_JUMP = [
    0.0, 0.2039, 0.1389, 0.2582, 0.3794, 0.3866, 0.4049, 0.7921, 0.5734, 0.7904, 0.7101,
    0.7082, 0.7305, 0.6191, 0.8092, 0.8772, 1.151, 0.8512, 0.9289, 0.9247, 1.152, 0.9026,
    1.192, 1.301, 1.079, 4.922, 18.7, 6.934, 9.265,
]  # fmt: skip


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


def joint_firings(det: LengthDrift, lengths: list[float], rewards: list[float]) -> list[int]:
    out = []
    for step, (n, r) in enumerate(zip(lengths, rewards, strict=True)):
        t = det.update(Observation(step, float(step), completion_length_mean=n, reward_mean=r))
        if t is not None and t.firing:
            out.append(step)
    return out


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


def _first_message(lengths: list[float], rewards: list[float]) -> str:
    det = LengthDrift(AlertsConfig().length_drift)
    for step, (n, r) in enumerate(zip(lengths, rewards, strict=True)):
        t = det.update(Observation(step, float(step), completion_length_mean=n, reward_mean=r))
        if t is not None and t.firing:
            return t.message
    return ""


def test_ratio_gates_need_a_log_stream() -> None:
    with pytest.raises(ValidationError, match="min_rise and min_fall are ratios to the level"):
        AlertsConfig.model_validate({"reward_collapse": {"min_fall": 0.5}})
    assert AlertsConfig.model_validate({"kl_surge": {"min_rise": 0.0}}).kl_surge.min_rise == 0.0


def test_kl_warmup_starts_once_the_policy_moves() -> None:
    """A TRL run whose first steps have all advantages 0 logs KL = 0 exactly until the policy
    moves: those records set no level (else any KL afterwards is a surge from ~0)."""
    for seed in range(20):
        kls = [0.0] * 10 + lognormal(0.1, 0.3, 40, seed)
        assert firings(KLSurge(AlertsConfig().kl_surge), "kl", kls) == [], seed


# Two healthy GRPO-loop runs of the failure corpus (build/failure_corpus.json), as recorded: a
# reward dip of three records while the completions grew 1.8x (rl-healthy-s19, steps 60-112),
# and a length wander to 1.5-1.8x for ~14 records (rl-healthy-s23, steps 40-100)
GRPO_REWARD_DIP = [
    0.2456, 0.2498, 0.2214, 0.2072, 0.223, 0.2207, 0.2234, 0.232, 0.1978, 0.2346, 0.2135,
    0.2162, 0.2247, 0.2103, 0.1984, 0.175, 0.2292, 0.2268, 0.2073, 0.1948, 0.2347, 0.2116,
    0.2386, 0.2427, 0.2251, 0.2823, 0.2204, 0.2536, 0.2417, 0.2243, 0.2344, 0.2476, 0.2295,
    0.2193, 0.2198, 0.2196, 0.2573, 0.2261, 0.23, 0.2268, 0.2049, 0.2636, 0.2311, 0.2248,
    0.2072, 0.196, 0.1927, 0.1627, 0.1516, 0.1692, 0.1995, 0.199, 0.216,
]  # fmt: skip
GRPO_LENGTH_WANDER = [
    26.25, 26.62, 28.5, 27.94, 27.5, 28.69, 30.88, 30.19, 29.06, 34.19, 30.94, 27.69, 28.12,
    29.5, 31.38, 29.5, 34.19, 38.62, 32.25, 28.31, 27.19, 26.25, 25.81, 25.19, 27.12, 28.31,
    26.94, 26.25, 26.44, 29.38, 25.75, 29.31, 25.19, 31.19, 28.81, 32.88, 28.19, 33.62, 39.0,
    42.19, 50.75, 49.5, 43.0, 50.88, 42.12, 33.62, 45.31, 39.31, 37.56, 32.25, 36.44, 29.31,
    31.75, 30.81, 27.25, 28.5, 25.44, 26.38, 22.69, 21.44, 22.94,
]  # fmt: skip


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


# ---------------------------------------------------------------- the failure corpus' false alarms

# Healthy GRPO-loop runs of the failure corpus (build/failure_corpus.json), as recorded (4
# significant digits), each up to a few records past where a detector used to fire on it.
# KL of rl-healthy-s33, steps 1-100: a steady climb 0.45 -> 1.7 nats over steps 78-94 that a
# 64-record median lags, then a lone record at 3.1 x that level (KLSurge fired at step 94)
GRPO_KL_CLIMB = [
    0.0, 0.1125, 0.1892, 0.391, 0.5272, 0.5276, 0.8786, 0.6439, 0.8403, 0.7125, 0.9216, 0.8848,
    0.6361, 0.8702, 0.6529, 2.335, 1.287, 0.4333, 0.448, 0.47, 0.4676, 0.3687, 0.3401, 0.4661,
    0.3589, 0.3746, 0.3215, 0.4785, 0.6956, 0.6599, 0.4981, 0.6147, 0.5033, 0.4993, 0.5565,
    0.5102, 0.4436, 0.4929, 0.587, 0.5301, 0.4565, 0.5097, 0.5912, 0.5074, 0.3956, 0.4614,
    0.3593, 0.3838, 0.5909, 0.4077, 0.4309, 0.4227, 0.4587, 0.3861, 0.3735, 0.3568, 0.3717,
    0.4996, 1.274, 0.5499, 0.7216, 0.6619, 0.787, 0.7032, 0.7039, 0.5092, 0.6173, 0.5483,
    0.5584, 0.3639, 0.4583, 0.4524, 0.4006, 0.7627, 0.4873, 0.6316, 0.5878, 0.4963, 0.4507,
    0.5559, 0.5472, 0.5791, 0.6102, 0.7626, 0.8079, 0.8802, 0.9135, 1.049, 1.046, 0.9283,
    1.336, 1.294, 1.497, 1.739, 1.551, 1.727, 1.587, 1.823, 1.561, 1.664,
]  # fmt: skip
# policy entropy of rl-healthy-s54, steps 1-46: a rise by a third over fifteen steps, then a
# lone record at 1.47 x the level (EntropySurge fired at step 40)
GRPO_ENTROPY_RISE = [
    1.34, 1.332, 1.309, 1.287, 1.275, 1.291, 1.232, 1.202, 1.123, 1.194, 1.238, 1.239, 1.155,
    1.133, 1.242, 1.195, 1.278, 1.259, 1.316, 1.276, 1.349, 1.358, 1.442, 1.321, 1.316, 1.373,
    1.489, 1.275, 1.636, 1.472, 1.482, 1.412, 1.539, 1.693, 1.776, 1.795, 1.681, 1.689, 1.687,
    1.947, 1.684, 1.565, 1.529, 1.568, 1.473, 1.427,
]  # fmt: skip
# policy entropy of rl-healthy-s49, steps 1-88: a slow fall of a tenth, then a lone record at
# 0.74 x the level (EntropyCollapse fired at step 82)
GRPO_ENTROPY_SAG = [
    1.411, 1.538, 1.749, 1.602, 1.478, 1.414, 1.346, 1.356, 1.346, 1.32, 1.331, 1.291, 1.333,
    1.337, 1.349, 1.325, 1.284, 1.344, 1.294, 1.365, 1.412, 1.435, 1.424, 1.435, 1.513, 1.377,
    1.416, 1.342, 1.343, 1.453, 1.362, 1.42, 1.388, 1.339, 1.383, 1.307, 1.328, 1.327, 1.265,
    1.229, 1.251, 1.238, 1.232, 1.276, 1.208, 1.245, 1.35, 1.267, 1.429, 1.376, 1.349, 1.342,
    1.322, 1.333, 1.386, 1.4, 1.334, 1.354, 1.405, 1.334, 1.258, 1.292, 1.321, 1.23, 1.274,
    1.328, 1.343, 1.278, 1.291, 1.268, 1.252, 1.16, 1.139, 1.234, 1.231, 1.21, 1.182, 1.138,
    1.288, 1.151, 1.122, 0.9866, 1.02, 1.098, 1.148, 1.165, 1.175, 1.175,
]  # fmt: skip
# the GRPO policy loss of rl-healthy-s34, steps 1-30: signed, around 0
GRPO_SIGNED_LOSS = [
    -0.04095, 0.1004, -0.02544, -0.04976, -0.04377, -0.08065, 0.002468, 0.06188, -0.03559,
    -0.04739, -0.04025, 0.03822, -0.05605, 0.05824, -0.05551, 0.04758, -0.06203, -0.2515,
    -0.03355, -0.04485, 0.1865, 0.06787, 0.1209, -0.1206, -0.0194, -0.03177, 0.05947, -0.1168,
    0.2287, 0.03268,
]  # fmt: skip


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


# The demo's destabilised GRPO loop (`inversion-monitor demo`, seed 0, default steps), as the
# server stored it: mean reward per step; the learning rate is 1000x from step 21, the reward
# ~0 from step 22. Its healthy twin (demo-rl) is the same until step 21.
DEMO_UNSTABLE_REWARD = [
    0.2537, 0.1097, 0.2236, 0.1661, 0.135, 0.2791, 0.2255, 0.169, 0.1691, 0.4272, 0.2544,
    0.2823, 0.1698, 0.2797, 0.2546, 0.309, 0.3705, 0.1958, 0.3109, 0.1373, 0.2791, 0.0005,
    0.0079, 0.0027, 0.0074, 0.004, 0.0095, 0.009, 0.0051, 0.0027, 0.0027, 0.0053, 0.0013,
    0.0092, 0.0026, 0.004, 0.0039, 0.0067, 0.0, 0.0, 0.0078, 0.0013, 0.0026, 0.0, 0.0026,
    0.004, 0.0026, 0.0039, 0.0, 0.0,
]  # fmt: skip
DEMO_HEALTHY_REWARD = [
    0.2537, 0.1097, 0.2236, 0.1661, 0.135, 0.2791, 0.2255, 0.169, 0.1691, 0.4272, 0.2544,
    0.2823, 0.1698, 0.2797, 0.2546, 0.309, 0.3705, 0.1958, 0.3109, 0.1373, 0.2791, 0.4278,
    0.2275, 0.3124, 0.1387, 0.3117, 0.3127, 0.3973, 0.1959, 0.2808, 0.256, 0.1939, 0.3389,
    0.2821, 0.1968, 0.2809, 0.2568, 0.196, 0.4258, 0.2812, 0.3111, 0.283, 0.3696, 0.3126,
    0.1674, 0.2531, 0.2831, 0.1964, 0.5429, 0.3989, 0.1657, 0.5114, 0.3938, 0.484, 0.3956,
    0.3378, 0.2252, 0.1957, 0.4264, 0.2568, 0.428, 0.4844, 0.2845, 0.4819, 0.3109, 0.3105,
    0.2536, 0.3987, 0.57, 0.3388, 0.4271, 0.6554, 0.2546, 0.2834, 0.6277, 0.6251, 0.2813,
    0.5403, 0.4837, 0.4836,
]  # fmt: skip


def _transitions(det: RewardCollapse, rewards: list[float]) -> list[Transition]:
    out = []
    for step, r in enumerate(rewards, start=1):
        t = det.update(Observation(step, float(step), reward_mean=r))
        if t is not None:
            out.append(t)
    return out


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


# ---------------------------------------------------------------- one-record collapse paths


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
