"""Synthetic RL-like streams: long healthy ones with the shapes of real runs (trends, wander,
heavy tails) and short ones with one rare fault shape each."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.failure_corpus import CorpusRun


def _lognormal(rng: np.random.Generator, level: np.ndarray, sd: float) -> np.ndarray:
    """Level x log-normal noise with heavy tails (Student t, 5 degrees of freedom)."""
    t = rng.standard_t(5, size=level.shape) * sd * math.sqrt(3 / 5)
    return np.asarray(level * np.exp(t))


def synthetic_healthy(steps: int, family: str, rng: np.random.Generator) -> CorpusRun:
    """A long healthy stream with the shapes of real runs: trends, wander, heavy tails."""
    t = np.arange(steps, dtype=np.float64)
    slow = np.cumsum(rng.normal(0.0, 0.002, steps))  # a slow random wander (log units)
    rec: dict[str, np.ndarray] = {
        "loss": _lognormal(rng, (1.0 + 2.0 * np.exp(-t / 400)) * np.exp(0.3 * slow), 0.04),
        "grad_norm": _lognormal(rng, (0.5 + 1.5 * np.exp(-t / 300)) * np.exp(slow), 0.15),
    }
    if family == "syn-rl":
        rec["reward_mean"] = (
            0.3
            + 0.4 * (1 - np.exp(-t / 3000))
            + 0.05 * np.sin(t / 500)
            + rng.normal(0, 0.04, steps)
        )
        # the policy sharpens slowly (-30% over 10k steps)
        rec["policy_entropy_mean"] = _lognormal(
            rng, (0.8 + 0.4 * np.exp(-t / 5000)) * np.exp(slow), 0.05
        )
        rec["kl"] = _lognormal(rng, 0.002 + 0.05 * (1 - np.exp(-t / 2000)), 0.15)
        rec["completion_length_mean"] = _lognormal(
            rng, 40.0 * np.exp(0.2 * np.sin(t / 700) + slow), 0.06
        )
        # a GRPO policy loss: signed, ~0, with the tails of every other stream here (the real
        # corpus' healthy signed losses reach robust z +4.4 on 18 per 10k records): Student t
        # (5 degrees of freedom) as a normal over sqrt(chi2 / 5), the chi2 from a spawned
        # generator so the other streams' draws are those of the Gaussian loss before it
        tails = np.sqrt(rng.spawn(1)[0].chisquare(5, steps) / 5)
        rec["loss"] = rng.normal(0.0, 0.02 * math.sqrt(3 / 5), steps) / tails
    records = [
        {"step": float(i + 1), **{k: float(v[i]) for k, v in rec.items()}} for i in range(steps)
    ]
    return CorpusRun(f"{family}-healthy", family, None, None, 0, records)


def synthetic_fault(kind: str, rng: np.random.Generator, trial: int) -> CorpusRun:
    """A 120-record RL-like stream with one rare fault shape from record 60."""
    base = synthetic_healthy(120, "syn-rl", rng)
    onset = 60
    for r in base.records:
        k = int(r["step"] or 0) - onset
        if k < 0:
            continue
        if kind == "inf_loss" and k == 0:
            r["loss"] = math.inf
        elif kind == "grad_spikes_growing" and k % 4 == 0:
            r["grad_norm"] = (r["grad_norm"] or 0.0) * (3.0 + k)
        elif kind == "kl_surge":
            r["kl"] = (r["kl"] or 0.0) * 6.0 + 0.05
        elif kind == "length_collapse":
            r["completion_length_mean"] = max(1.0, (r["completion_length_mean"] or 0.0) * 0.5**k)
        elif kind == "entropy_surge":
            r["policy_entropy_mean"] = (r["policy_entropy_mean"] or 0.0) * 2.0
        elif kind == "entropy_drop":
            r["policy_entropy_mean"] = (r["policy_entropy_mean"] or 0.0) * 0.5
        elif kind == "reward_slide":
            r["reward_mean"] = (r["reward_mean"] or 0.0) - min(0.3, 0.1 * (k + 1))
        elif kind == "loss_step":
            r["loss"] = (r["loss"] or 0.0) + 0.15
    return CorpusRun(f"syn-{kind}-t{trial}", "syn-rl", kind, onset, trial, base.records)


SYNTHETIC_FAULTS = (
    "inf_loss",
    "grad_spikes_growing",
    "kl_surge",
    "length_collapse",
    "entropy_surge",
    "entropy_drop",
    "reward_slide",
    "loss_step",
)


def synthetic_corpus(trials: int, healthy_steps: int, rng: np.random.Generator) -> list[CorpusRun]:
    runs = [synthetic_healthy(healthy_steps, "syn-rl", rng)]
    runs += [synthetic_fault(kind, rng, t) for kind in SYNTHETIC_FAULTS for t in range(trials)]
    return runs
