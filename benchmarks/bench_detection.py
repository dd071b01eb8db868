"""Detection quality of the alert detectors: run it, read the table (no pass/fail).

    .venv/bin/python benchmarks/bench_detection.py [--trials 200] [--healthy-steps 50000]

Per step, rho is the Spearman correlation of n sampled (entropy, score) pairs
drawn from a bivariate normal whose Spearman correlation follows a known path
(Pearson r = 2 sin(pi rho / 6)); entropy means are the mean of n token
entropies. Scenarios, change at step 200 (after the detectors' warm-up):

- healthy: rho = -0.5 + 0.05 sin(2 pi t / 2000) (slow drift), entropy flat;
- step: rho jumps to -0.2 (a shift of 0.3);
- ramp: rho rises linearly to 0 over 300 steps;
- entropy: mean entropy falls from 2.0 to 0.5 nats over 100 steps.

Printed: median and p90 delay (steps after the change until the first alert;
"miss" when more than half the trials never fire within 400 steps), false
alarms per 10,000 healthy steps (alerts started), for the real detectors
(:mod:`inversion_monitor.server.detectors`, defaults) and a naive static rule
(alarm whenever rho > -0.3; entropy: mean < 0.5 x its first-20 mean).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from inversion_monitor.server.detectors import (
    AlertsConfig,
    EntropyCollapse,
    InversionLost,
    InversionWeakening,
    Observation,
)

CHANGE = 200
HORIZON = 400


def spearman_path(rho: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One Spearman rho per step from n pairs with the given true Spearman correlation."""
    steps = len(rho)
    r = 2.0 * np.sin(np.pi * rho / 6.0)
    a = rng.standard_normal((steps, n))
    b = r[:, None] * a + np.sqrt(1.0 - r[:, None] ** 2) * rng.standard_normal((steps, n))
    ra = a.argsort(axis=1).argsort(axis=1).astype(np.float64)
    rb = b.argsort(axis=1).argsort(axis=1).astype(np.float64)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    return np.asarray((ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1)))


def entropy_path(level: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of n token entropies (gamma-distributed, mean ``level``, sd ~ level/sqrt(2))."""
    shape = 2.0
    draws = rng.gamma(shape, (level / shape)[:, None], size=(len(level), n))
    return np.asarray(draws.mean(axis=1))


def healthy_rho(steps: int) -> np.ndarray:
    t = np.arange(steps)
    return -0.5 + 0.05 * np.sin(2 * np.pi * t / 2000.0)


def scenario(name: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rho = healthy_rho(steps)
    ent = np.full(steps, 2.0)
    after = np.arange(steps) >= CHANGE
    if name == "step":
        rho[after] = -0.2
    elif name == "ramp":
        k = np.arange(steps) - CHANGE
        rho = np.where(after, np.minimum(0.0, -0.5 + 0.5 * k / 300.0), rho)
    elif name == "entropy":
        k = np.arange(steps) - CHANGE
        ent = np.where(after, np.maximum(0.5, 2.0 - 1.5 * k / 100.0), ent)
    return rho, ent


def detectors(cfg: AlertsConfig) -> dict[str, InversionWeakening | InversionLost | EntropyCollapse]:
    return {
        "weakening": InversionWeakening(cfg.weakening),
        "lost": InversionLost(cfg.lost),
        "entropy": EntropyCollapse(cfg.entropy),
    }


def feed(
    rhos: np.ndarray, ents: np.ndarray, n: int, cfg: AlertsConfig
) -> tuple[dict[str, list[int]], list[int], list[int]]:
    """Start steps of each detector's alerts, and of the naive rho and entropy rules."""
    dets = detectors(cfg)
    fired: dict[str, list[int]] = {k: [] for k in dets}
    naive: list[int] = []
    naive_ent: list[int] = []
    above = low = False
    early = float(np.mean(ents[:20]))
    for step, (rho, ent) in enumerate(zip(rhos.tolist(), ents.tolist(), strict=True)):
        obs = Observation(step, float(step), rho, n, ent)
        for key, det in dets.items():
            t = det.update(obs)
            if t is not None and t.firing:
                fired[key].append(step)
        if step >= 20:
            now_above = rho > -0.3
            if now_above and not above:
                naive.append(step)
            above = now_above
            now_low = ent < 0.5 * early
            if now_low and not low:
                naive_ent.append(step)
            low = now_low
    return fired, naive, naive_ent


def delay(starts: list[int]) -> float:
    after = [s - CHANGE for s in starts if CHANGE <= s < CHANGE + HORIZON]
    return float(after[0]) if after else math.inf


def summarise(delays: list[float]) -> str:
    arr = np.array(delays)
    if np.mean(np.isfinite(arr)) < 0.5:
        return f"{'miss':>6} {'':>6}"
    return f"{np.quantile(arr, 0.5):6.0f} {np.quantile(arr, 0.9):6.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="streams per change scenario")
    parser.add_argument("--healthy-steps", type=int, default=50_000, help="healthy steps per n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 256])
    args = parser.parse_args()
    cfg = AlertsConfig()
    rng = np.random.default_rng(args.seed)
    print(
        f"defaults: weakening warmup={cfg.weakening.warmup} min_shift={cfg.weakening.min_shift}"
        f" threshold={cfg.weakening.threshold}; lost sustain={cfg.lost.sustain}; entropy"
        f" fraction={cfg.entropy.fraction} max_drop/100={cfg.entropy.max_drop_per_100_steps};"
        f" {args.trials} trials, {args.healthy_steps} healthy steps per n"
    )
    header = (
        f"{'n':>4} {'scenario':<9} {'detector':<11} {'median':>6} {'p90':>6}"
        f"   {'naive med':>9} {'p90':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for name, key in (
            ("step", "weakening"),
            ("step", "lost"),
            ("ramp", "weakening"),
            ("ramp", "lost"),
            ("entropy", "entropy"),
        ):
            ours: list[float] = []
            base: list[float] = []
            for _ in range(args.trials):
                rho_true, ent_true = scenario(name, CHANGE + HORIZON)
                rhos = spearman_path(rho_true, n, rng)
                ents = entropy_path(ent_true, n, rng)
                fired, naive, naive_ent = feed(rhos, ents, n, cfg)
                ours.append(delay(fired[key]))
                base.append(delay(naive_ent if key == "entropy" else naive))
            print(f"{n:>4} {name:<9} {key:<11} {summarise(ours)}   {summarise(base):>16}")
        rho_true, ent_true = scenario("healthy", args.healthy_steps)
        fired, naive, naive_ent = feed(
            spearman_path(rho_true, n, rng), entropy_path(ent_true, n, rng), n, cfg
        )
        scale = 10_000 / args.healthy_steps
        counts = "  ".join(f"{k}={len(v) * scale:.2f}" for k, v in fired.items())
        print(
            f"{n:>4} healthy   false alarms / 10k steps: {counts}; naive rho>-0.3="
            f"{len(naive) * scale:.1f}, naive entropy={len(naive_ent) * scale:.2f}"
        )


if __name__ == "__main__":
    main()
