"""The detectors' per-record updates against their plain versions.

:meth:`DriftDetector.update <inversion_monitor.server.detectors.robust.DriftDetector.update>`,
:meth:`InversionWeakening.update`, :meth:`InversionLost.update` and
:meth:`NonFiniteTraining.update` run on every record of
every run, so they build nothing on the quiet path (no values dict, no list of sides) and
read the baseline once. Here the plain versions (each value read through Observation's
properties, the values dict and the list of sides built on every record) are patched in
and the same observation stream must give the same transitions, value for value.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from inversion_monitor.server.detectors.base import (
    Z_95,
    Observation,
    Reason,
    Transition,
)
from inversion_monitor.server.detectors.config import AlertsConfig
from inversion_monitor.server.detectors.inversion import (
    InversionLost,
    InversionWeakening,
    _weighted_mean_z,
)
from inversion_monitor.server.detectors.nonfinite import NonFiniteTraining
from inversion_monitor.server.detectors.robust import Direction, DriftDetector, times
from inversion_monitor.server.detectors.run import RunDetectors
from tests.test_detector_fast_paths import OPTIONAL_DOUBLES


def plain_drift_update(self: DriftDetector, obs: Observation) -> Transition | None:
    x = self.value(obs)
    if x is None or not math.isfinite(x):
        return None
    score = self.stream.update(x, learn=not self.active)
    if score is None:
        return None
    cfg = self.config
    values = {
        self.field: x,
        "level": max(score.level - cfg.floor, 0.0) if self.stream.log else score.level,
        "robust_z": score.z,
        "cusum": score.up if self.side is not Direction.DOWN else score.down,
        "threshold": cfg.threshold,
    }
    if cfg.confirm_z is not None:  # records in a row confirm_z robust SDs out and far
        out = False
        for d, _ in self._sides(score):
            z_out = score.z >= cfg.confirm_z if d is Direction.UP else score.z <= -cfg.confirm_z
            out = out or (z_out and self._far(d, score))
        self._out_run = self._out_run + 1 if out else 0
    pattern = self.pattern(score)
    if not self.active:
        over = [(d, c) for d, c in self._sides(score) if c > cfg.threshold and self._far(d, score)]
        self._confirmed = self._confirmed + 1 if over else 0
        if (self._confirmed if cfg.confirm_z is None else self._out_run) < cfg.confirm:
            over = []
        if not over and pattern is None:
            return None
        self._confirmed = self._out_run = 0
        if over:
            side, cusum = max(over, key=lambda dc: dc[1])
        else:
            assert pattern is not None
            side = pattern[0]
            cusum = score.up if side is Direction.UP else score.down
        self.active, self.side, self._start_step = True, side, obs.step
        values["cusum"] = cusum
        level = values["level"]
        ratio = (
            f"is {times(x / level)} x its level {level:.4g}"
            if self.stream.log and level > 0.0
            else f"vs its level {level:.4g}"
        )
        if over:
            why = f"CUSUM {cusum:.1f} > {cfg.threshold:g} robust SDs of this run"
            detail = f"{self.what} {x:.4g} {ratio} (robust z {score.z:+.1f}; {why})"
        else:
            assert pattern is not None
            detail = f"{self.what} {x:.4g} {ratio} (robust z {score.z:+.1f}): {pattern[1]}"
        return Transition(
            self.name,
            cfg.severity,
            True,
            self.reasons.get(side, Reason.CUSUM_EXCEEDED),
            obs.step,
            obs.wall_time,
            self.summaries[side],
            f"{detail} at step {obs.step}",
            values,
        )
    cusum = score.up if self.side is Direction.UP else score.down
    near = score.z <= cfg.back_z if self.side is Direction.UP else score.z >= -cfg.back_z
    self._back_run = self._back_run + 1 if near else 0
    if (cusum > 0.0 and self._back_run < cfg.back_records) or self.holds(score):
        return None
    self._back_run = 0
    if self.side is Direction.UP:
        self.stream.up = 0.0
    else:
        self.stream.down = 0.0
    self.active = False
    ended, self.side = self.side, None
    return Transition(
        self.name,
        cfg.severity,
        False,
        Reason.RECOVERED,
        obs.step,
        obs.wall_time,
        f"{self.what.capitalize()} back at its level",
        f"{self.what} {x:.4g} back near its level {values['level']:.4g} at step {obs.step}; "
        f"the {'rise' if ended is Direction.UP else 'fall'} began at step {self._start_step}",
        values,
    )


def plain_weakening_update(self: InversionWeakening, obs: Observation) -> Transition | None:
    if not obs.usable_rho:
        return None
    z, se = obs.z, obs.se
    if self.baseline_z is None:
        self._warm.append((z, 1.0 / se**2))
        if len(self._warm) >= self.config.warmup:
            self.baseline_z, _ = _weighted_mean_z(self._warm)
        return None
    if math.tanh(self.baseline_z) >= self.config.max_baseline:
        return None
    shift = self._reference_shift_z()
    h = self.config.threshold
    self.cusum = max(0.0, self.cusum + (z - self.baseline_z - shift) / se)
    if self.active:
        self.cusum = min(self.cusum, 2.0 * h)
    rho0 = math.tanh(self.baseline_z)
    values = {
        "rho": float(obs.rho or 0.0),
        "baseline_rho": rho0,
        "cusum": self.cusum,
        "threshold": h,
        "n": float(obs.n),
    }
    if not self.active and self.cusum > h:
        self.active = True
        self._start_step = obs.step
        return Transition(
            self.name,
            self.config.severity,
            True,
            Reason.CUSUM_EXCEEDED,
            obs.step,
            obs.wall_time,
            "Entropy-gradient inversion weakening",
            f"rho rose from its established level {rho0:.3f} (latest {obs.rho:.3f}, "
            f"n={obs.n}); CUSUM {self.cusum:.1f} > threshold {h:g} at step {obs.step}",
            values,
        )
    if self.active and self.cusum == 0.0:
        self.active = False
        return Transition(
            self.name,
            self.config.severity,
            False,
            Reason.RECOVERED,
            obs.step,
            obs.wall_time,
            "Entropy-gradient inversion back to its level",
            f"rho back near its established level {rho0:.3f} (latest {obs.rho:.3f}, "
            f"n={obs.n}) at step {obs.step}; weakening began at step {self._start_step}",
            values,
        )
    return None


def plain_lost_update(self: InversionLost, obs: Observation) -> Transition | None:
    if not obs.usable_rho:
        return None
    z, se = obs.z, obs.se
    if self.established is None:
        self._warm.append((z, 1.0 / se**2))
        if len(self._warm) >= self.config.warmup:
            mean, total = _weighted_mean_z(self._warm)
            self.baseline_rho = math.tanh(mean)
            self.established = mean + Z_95 / math.sqrt(total) < 0.0
        return None
    if not self.established:
        return None
    upper = math.tanh(z + Z_95 * se)
    gone = upper >= 0.0
    self._run = self._run + 1 if gone != self.active else 0
    if self._run < self.config.sustain:
        return None
    self._run = 0
    self.active = gone
    values = {
        "rho": float(obs.rho or 0.0),
        "ci_upper": upper,
        "baseline_rho": self.baseline_rho,
        "n": float(obs.n),
        "sustain": float(self.config.sustain),
    }
    if gone:
        return Transition(
            self.name,
            self.config.severity,
            True,
            Reason.CI_REACHES_ZERO,
            obs.step,
            obs.wall_time,
            "Entropy-gradient inversion lost",
            f"the 95% CI of rho reaches 0 for {self.config.sustain} records (latest rho "
            f"{obs.rho:.3f}, CI upper {upper:.3f}, n={obs.n}); established level was "
            f"{self.baseline_rho:.3f}",
            values,
        )
    return Transition(
        self.name,
        self.config.severity,
        False,
        Reason.RECOVERED,
        obs.step,
        obs.wall_time,
        "Entropy-gradient inversion re-established",
        f"the 95% CI of rho is below 0 again for {self.config.sustain} records (latest rho "
        f"{obs.rho:.3f}, CI upper {upper:.3f}, n={obs.n})",
        values,
    )


def plain_nonfinite_update(self: NonFiniteTraining, obs: Observation) -> Transition | None:
    cfg = self.config
    bad: dict[str, float] = {}
    seen = False
    for name in cfg.fields:
        value: float | None = getattr(obs, name)
        if value is not None:
            seen = True
            if not math.isfinite(value):
                bad[name] = value
    for name in obs.nonfinite_fields:
        if name in cfg.fields and name not in bad:
            bad[name] = math.nan
    if not seen and not bad:
        return None
    if bad:
        self._finite_run = 0
        if self.active:
            return None
        self.active, self._start_step = True, obs.step
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        return Transition(
            self.name,
            cfg.severity,
            True,
            Reason.NON_FINITE,
            obs.step,
            obs.wall_time,
            "Training diverged: non-finite " + ", ".join(bad),
            f"{what} at step {obs.step}: the run diverged",
            {f"{k}_nonfinite": 1.0 for k in bad},
        )
    if not self.active:
        return None
    self._finite_run += 1
    if self._finite_run < cfg.recover:
        return None
    self.active = False
    return Transition(
        self.name,
        cfg.severity,
        False,
        Reason.RECOVERED,
        obs.step,
        obs.wall_time,
        "Training values finite again",
        f"{cfg.recover} records with finite {', '.join(cfg.fields)} at step {obs.step}; "
        f"non-finite values began at step {self._start_step}",
        {"finite_records": float(self._finite_run)},
    )


def _observations(seed: str, steps: int = 2500) -> list[Observation]:
    """A run's records with faults and recoveries in every field, rho rising to 0 and back
    (so every detector fires and ends), missing and non-finite values, ties and odd n."""
    rng = random.Random(seed)
    levels = {name: rng.uniform(0.5, 5.0) for name in OPTIONAL_DOUBLES}
    rho_level = -0.4
    shifted, factor = OPTIONAL_DOUBLES[0], 1.0
    out = []
    for step in range(1, steps):
        if step % 150 == 100:
            shifted = rng.choice(OPTIONAL_DOUBLES)
            factor = rng.choice([0.1, 0.5, 3.0, 10.0])
            levels[shifted] *= factor
        if step % 150 == 130:  # the fault ends (an alert on it ends when it does)
            levels[shifted] /= factor
        if step % 400 == 300:
            rho_level = rng.choice([-0.4, -0.1, 0.1, 0.3])
        fields: dict[str, float | None] = {}
        for name, level in levels.items():
            r = rng.random()
            value = level * math.exp(rng.gauss(0.0, 0.05))
            fields[name] = (
                None
                if r < 0.1
                else rng.choice([math.nan, math.inf, -math.inf])
                if r < 0.12
                else round(level, 1)
                if r < 0.15
                else min(value, 1.0)
                if name == "clip_ratio"
                else value
            )
        r = rng.random()
        rho = (
            None
            if r < 0.05
            else math.nan
            if r < 0.06
            else rng.choice([1.0, -1.0])
            if r < 0.07
            else max(-1.0, min(1.0, rng.gauss(rho_level, 0.05)))
        )
        out.append(
            Observation(
                step,
                float(step),
                rho=rho,
                n=rng.choice([256, 256, 256, 3, 4, 64]),
                entropy_mean=rng.uniform(1.5, 2.5) / (1 + step / 900),
                **fields,  # type: ignore[arg-type]
            )
        )
    return out


def _transitions(kind: str, observations: list[Observation]) -> list[Transition]:
    detectors = RunDetectors(AlertsConfig(), kind).detectors
    return [t for obs in observations for det in detectors if (t := det.update(obs)) is not None]


@pytest.mark.parametrize("kind", ["sft", "rl", "custom", ""])
def test_updates_match_the_plain_versions(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    observations = _observations(kind)
    fast = _transitions(kind, observations)
    monkeypatch.setattr(DriftDetector, "update", plain_drift_update)
    monkeypatch.setattr(InversionWeakening, "update", plain_weakening_update)
    monkeypatch.setattr(InversionLost, "update", plain_lost_update)
    monkeypatch.setattr(NonFiniteTraining, "update", plain_nonfinite_update)
    plain = _transitions(kind, observations)
    assert len(fast) == len(plain)
    for got, want in zip(fast, plain, strict=True):
        assert got == want
    # the stream moved the detectors both ways: drift and inversion alerts fired and ended
    fired = Counter((t.name.value, t.firing) for t in fast)
    for name in ("InversionWeakening", "InversionLost", "NonFiniteTraining"):
        assert fired[(name, True)] and fired[(name, False)], (name, fired)
    detectors = RunDetectors(AlertsConfig(), kind).detectors
    drift = {d.name.value for d in detectors if isinstance(d, DriftDetector)}
    assert sum(fired[(name, True)] for name in drift) >= 2, fired
    assert sum(fired[(name, False)] for name in drift) >= 2, fired


def _recorded_streams() -> list[tuple[str, list[float]]]:
    """Recorded corpus and demo streams that reach the paths the random run above does not:
    RewardCollapse's collapse rule (fired by the pattern, held while the reward stays low),
    KLSurge's confirmation after a drift-charged CUSUM and its count of records out before the
    CUSUM passes (``confirm_z``), a signed loss's capped z."""
    from tests.health_streams import (
        DEMO_UNSTABLE_REWARD,
        GRPO_KL_CLIMB,
        GRPO_KL_JUMP,
        GRPO_SIGNED_LOSS,
    )

    return [
        ("reward_mean", DEMO_UNSTABLE_REWARD + DEMO_UNSTABLE_REWARD[:30]),
        ("kl", [*GRPO_KL_CLIMB, 6.0, 7.0, 6.5, *GRPO_KL_CLIMB[60:]]),
        ("kl", [*GRPO_KL_JUMP, *GRPO_KL_JUMP[5:25] * 3]),
        ("loss", [*GRPO_SIGNED_LOSS, 0.79, *[0.4] * 5, *GRPO_SIGNED_LOSS]),
    ]


@pytest.mark.parametrize("field, values", _recorded_streams())
def test_recorded_streams_match_the_plain_version(
    field: str, values: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    observations = [
        Observation(step, float(step), **{field: v})  # type: ignore[arg-type]
        for step, v in enumerate(values, start=1)
    ]
    fast = _transitions("rl", observations)
    monkeypatch.setattr(DriftDetector, "update", plain_drift_update)
    plain = _transitions("rl", observations)
    assert fast == plain
    fired = Counter((t.name.value, t.firing) for t in fast)
    assert any(firing for _, firing in fired) and any(not firing for _, firing in fired), fired


def _jumps_together() -> list[tuple[str, list[Observation]]]:
    """Two signals jumping on one record (a learning-rate jump): the grad norm with a positive
    loss, the KL with the policy entropy; the confirmed one-record rules fire on them."""
    rng = random.Random(25)
    sft, rl = [], []
    for step in range(1, 120):
        jump = step in (60, 61)
        sft.append(
            Observation(
                step,
                float(step),
                loss=1.3 * math.exp(rng.gauss(0.0, 0.03)) * (2.5 if jump else 1.0),
                grad_norm=math.exp(rng.gauss(0.0, 0.25)) * (9.0 if step == 60 else 1.0),
            )
        )
        rl.append(
            Observation(
                step,
                float(step),
                policy_entropy_mean=1.45 * math.exp(rng.gauss(0.0, 0.03)) * (0.5 if jump else 1),
                kl=0.15 * math.exp(rng.gauss(0.0, 0.3)) * (20.0 if step == 60 else 1.0),
            )
        )
    return [("sft", sft), ("rl", rl)]


@pytest.mark.parametrize("kind, observations", _jumps_together())
def test_confirmed_one_record_rules_match_the_plain_version(
    kind: str, observations: list[Observation], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _transitions(kind, observations)
    monkeypatch.setattr(DriftDetector, "update", plain_drift_update)
    assert fast == _transitions(kind, observations)
    words = "with the loss" if kind == "sft" else "with the policy entropy"
    assert any(t.firing and t.step == 60 and words in t.message for t in fast), fast
