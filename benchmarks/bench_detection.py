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

RL runs (``--rl-trials``, 0 to skip): synthetic runs drawn from the
entropy-performance law R = -a e^H + b (Cui et al.) with noise. Policy entropy
H(t) = H_end + (H_0 - H_end) e^{-t/tau} plus per-record noise (sd
``--entropy-noise``), reward R(H) plus noise (sd ``--reward-noise``), with
a, b, H_0, tau drawn per run (the ceiling -a + b in [0.5, 0.95]). Printed:

- the ceiling forecast of :func:`~inversion_monitor.server.entropy_law.fit_entropy_law`
  (the server's online tracker) against the fraction of the run's records seen:
  median and p90 of |forecast - true ceiling| / true ceiling, and how often the
  95% interval covers the truth;
- the lead time of EntropyExhaustion (defaults) before the noiseless reward
  reaches 95% of its final value, against a static threshold rule (policy
  entropy EWMA below 0.5 x its early level: EntropyCollapse's rule);
- false alerts per 10k records on healthy runs: SFT-like (entropy falls as the
  model learns, no reward; detectors of an ``sft`` run, and for contrast of a
  run of unknown kind) and RL-like (entropy steady, reward noisy).
Goals (issue 18): forecast within 10% after half the run; alert before 95%;
<= 1 false alert per 10k healthy records.

Training health (``--corpus``, issue 25): the failure corpus of
:mod:`failure_corpus` (real toy runs: HF Trainer SFT, the demo's GRPO loop and TRL GRPO,
healthy over several seeds and with injected faults; built once and cached,
``--rebuild`` to redo it) and synthetic streams for rare shapes, fed record by
record to the server's detectors; per detector the median and worst delay
(records after the onset), misses and false alarms per 10,000 healthy steps,
side by side with a static threshold and a running-mean spike rule at an equal
false-alarm count (:mod:`benchmarks.detection`), the same hand rules fitted on half
the healthy seeds and judged on the other half (the synthetic section's on a second
draw of the same law), what a one-record loss or grad-norm rule as early as the synthetic
static rule would raise on the real corpus' healthy records, the alerts that ended while
their fault lasted (their value back, or still away), and rho's lead or lag on the RL
faults. Goals: every fault caught within its budget, <= 1 false alarm per 10k
healthy steps, no detector later than a hand rule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inversion_monitor.server.detectors import (
    AlertsConfig,
    EntropyCollapse,
    EntropyExhaustion,
    InversionLost,
    InversionWeakening,
    Observation,
    RunDetectors,
)
from inversion_monitor.server.entropy_law import EntropyLawTracker

if TYPE_CHECKING:  # pragma: no cover
    from benchmarks.failure_corpus import CorpusRun

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
    parser.add_argument("--rl-trials", type=int, default=200, help="RL runs on the law; 0: skip")
    parser.add_argument("--rl-records", type=int, default=1000, help="records per RL run")
    parser.add_argument("--rl-healthy-records", type=int, default=50_000)
    parser.add_argument("--entropy-noise", type=float, default=0.02, help="sd per record, nats")
    parser.add_argument("--reward-noise", type=float, default=0.05, help="sd of the mean reward")
    parser.add_argument("--rl-only", action="store_true", help="only the RL section")
    parser.add_argument(
        "--exhaustion", default="{}", help='EntropyExhaustion settings as JSON, e.g. {"sustain": 5}'
    )
    parser.add_argument("--corpus", action="store_true", help="only the training-health section")
    parser.add_argument("--corpus-path", type=Path, default=None, help="the cached corpus")
    parser.add_argument("--rebuild", action="store_true", help="train the corpus again")
    parser.add_argument("--jobs", type=int, default=2, help="processes training the corpus")
    parser.add_argument("--syn-trials", type=int, default=20, help="synthetic faults per shape")
    parser.add_argument("--syn-healthy-steps", type=int, default=50_000)
    parser.add_argument(
        "--syn-seeds",
        type=int,
        nargs="*",
        default=[],
        help="more draws of the synthetic streams, a line each (their goals, late faults, most "
        "false alarms, hand-rule lines by detector); the section above is --seed's draw",
    )
    args = parser.parse_args()
    if args.corpus:
        corpus_section(args, np.random.default_rng(args.seed))
        return
    if args.rl_only:
        rl_section(args, np.random.default_rng(args.seed))
        return
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
    if args.rl_trials:
        rl_section(args, rng)


# ---------------------------------------------------------------- RL runs on the law


def law_run(
    records: int,
    rng: np.random.Generator,
    entropy_noise: float,
    reward_noise: float,
    h_end_range: tuple[float, float] = (0.02, 0.1),
) -> dict[str, object]:
    """One synthetic RL run drawn from R = -a e^H + b with noise."""
    a = rng.uniform(0.15, 0.6)
    h0 = rng.uniform(1.0, 2.0)
    h_end = rng.uniform(*h_end_range)
    ceiling = rng.uniform(0.5, 0.95)
    b = ceiling + a
    tau = rng.uniform(records / 8, records / 2)
    t = np.arange(records)
    h_true = h_end + (h0 - h_end) * np.exp(-t / tau)
    r_true = -a * np.exp(h_true) + b
    h = np.maximum(0.0, h_true + rng.normal(0.0, entropy_noise, records))
    r = -a * np.exp(h) + b + rng.normal(0.0, reward_noise, records)
    return {"ceiling": ceiling, "h": h, "r": r, "r_true": r_true}


def static_rule(hs: np.ndarray, fraction: float = 0.5, warmup: int = 20) -> int | None:
    """First record where the entropy EWMA (0.1) falls below ``fraction`` x its early mean."""
    early = float(np.mean(hs[:warmup]))
    ewma = float(hs[0])
    for i, h in enumerate(hs.tolist()):
        ewma += 0.1 * (h - ewma)
        if i >= warmup and ewma < fraction * early:
            return i
    return None


def rl_section(args: argparse.Namespace, rng: np.random.Generator) -> None:
    records = args.rl_records
    cfg = AlertsConfig.model_validate({"exhaustion": json.loads(args.exhaustion)})
    ex = cfg.exhaustion
    print()
    print(
        f"RL runs on the law: {args.rl_trials} runs of {records} records, entropy noise "
        f"{args.entropy_noise}, reward noise {args.reward_noise}; EntropyExhaustion "
        f"progress={ex.progress} trend_window={ex.trend_window} falling_t={ex.falling_t} "
        f"sustain={ex.sustain}"
    )
    fractions = (0.1, 0.25, 0.5, 0.75, 1.0)
    errors: dict[float, list[float]] = {f: [] for f in fractions}
    covered: dict[float, list[bool]] = {f: [] for f in fractions}
    # entropy exhausted (ends at 0.02-0.1 nats: the alert is due before the reward
    # saturates) or plateauing (ends at 0.3-0.7 nats: the reward saturates below the
    # ceiling because entropy stopped falling; firing is right only if most of the
    # law's gain was used, so these rows are for information)
    leads: dict[str, list[float]] = {"exhausted": [], "plateau": []}
    static_leads: dict[str, list[float]] = {"exhausted": [], "plateau": []}
    for trial in range(args.rl_trials):
        family = "exhausted" if trial % 2 == 0 else "plateau"
        h_end_range = (0.02, 0.1) if family == "exhausted" else (0.3, 0.7)
        run = law_run(records, rng, args.entropy_noise, args.reward_noise, h_end_range)
        hs, rs, r_true = run["h"], run["r"], run["r_true"]
        assert isinstance(hs, np.ndarray) and isinstance(rs, np.ndarray)
        assert isinstance(r_true, np.ndarray)
        ceiling = float(run["ceiling"])  # type: ignore[arg-type]
        tracker = EntropyLawTracker()
        det = EntropyExhaustion(ex)
        checkpoints = {int(f * records) - 1: f for f in fractions}
        first_alert: int | None = None
        for i, (h, r) in enumerate(zip(hs.tolist(), rs.tolist(), strict=True)):
            tracker.update(i, h, r)
            t = det.update(Observation(i, float(i), reward_mean=r, policy_entropy_mean=h))
            if t is not None and t.firing and first_alert is None:
                first_alert = i
            if i in checkpoints:
                fit = tracker.fit
                f = checkpoints[i]
                if fit is None or not fit.valid:
                    errors[f].append(math.inf)
                    covered[f].append(False)
                else:
                    errors[f].append(abs(fit.ceiling - ceiling) / ceiling)
                    covered[f].append(abs(fit.ceiling - ceiling) <= 1.96 * fit.ceiling_se)
        final = float(r_true[-1])
        saturation = int(np.argmax(r_true >= 0.95 * final))
        leads[family].append(saturation - first_alert if first_alert is not None else -math.inf)
        static = static_rule(hs)
        static_leads[family].append(saturation - static if static is not None else -math.inf)
    print(
        f"{'records seen':>12} {'median err':>10} {'p90 err':>8} {'no fit':>6} {'95% CI cover':>12}"
    )
    for f in fractions:
        arr = np.array(errors[f])
        finite = arr[np.isfinite(arr)]
        no_fit = float(np.mean(~np.isfinite(arr)))
        med = f"{np.median(arr):10.1%}" if no_fit < 0.5 else f"{'-':>10}"
        p90 = f"{np.quantile(arr, 0.9):8.1%}" if no_fit < 0.1 else f"{'-':>8}"
        cover = np.mean(covered[f]) if finite.size else 0.0
        print(f"{f:>12.0%} {med} {p90} {no_fit:6.0%} {cover:12.0%}")

    def lead_line(name: str, values: list[float]) -> str:
        arr = np.array(values)
        before = float(np.mean(arr > 0))
        fin = arr[np.isfinite(arr)]
        if fin.size == 0:
            return f"{name:<28} never fired"
        return (
            f"{name:<28} fired before 95%: {before:5.0%}  lead records median "
            f"{np.median(fin):6.0f}  p10 {np.quantile(fin, 0.1):6.0f}  "
            f"never fired {float(np.mean(~np.isfinite(arr))):4.0%}"
        )

    print("lead time (records) before the noiseless reward reaches 95% of its final value:")
    for family in ("exhausted", "plateau"):
        print(f"  runs whose entropy is {family}:")
        print("    " + lead_line("EntropyExhaustion", leads[family]))
        print("    " + lead_line("static: entropy < 0.5 x early", static_leads[family]))

    # healthy runs: false alerts per 10k records
    steps = args.rl_healthy_records
    scale = 10_000 / steps
    t = np.arange(steps)
    rho = spearman_path(healthy_rho(steps), 64, rng)
    # SFT-like: entropy falls as the model learns (2.0 -> 1.0 nats), no reward
    sft_h = entropy_path(1.0 + 1.0 * np.exp(-t / (steps / 10)), 64, rng)
    # RL-like: policy entropy steady with slow wander; reward noisy and slowly rising
    rl_h = 1.2 + 0.05 * np.sin(2 * np.pi * t / 3000) + rng.normal(0, args.entropy_noise, steps)
    rl_r = 0.4 + 0.1 * (1 - np.exp(-t / steps)) + rng.normal(0, args.reward_noise, steps)

    def count(kind: str, policy: bool) -> dict[str, int]:
        dets = RunDetectors(cfg, kind)
        out: dict[str, int] = {}
        for i in range(steps):
            obs = Observation(
                i,
                float(i),
                float(rho[i]),
                64,
                float(sft_h[i]) if not policy else 2.0,
                float(rl_r[i]) if policy else None,
                float(rl_h[i]) if policy else None,
            )
            for tr in dets.update(obs):
                if tr.firing:
                    out[tr.name.value] = out.get(tr.name.value, 0) + 1
        return out

    for label, kind, policy in (
        ("SFT-like, kind sft", "sft", False),
        ("SFT-like, kind unknown", "", False),
        ("RL-like, kind rl", "rl", True),
    ):
        counts = count(kind, policy)
        total = sum(counts.values())
        detail = ", ".join(f"{k}={v * scale:.2f}" for k, v in sorted(counts.items())) or "none"
        print(
            f"healthy {label:<24} false alerts / 10k records: {total * scale:.2f} ({detail}; "
            f"{steps} records)"
        )


# ---------------------------------------------------------------- training health


def corpus_section(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, bool]:
    """The detectors on the failure corpus and the synthetic streams (see the docstring)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import failure_corpus as fc
    from benchmarks.detection import (
        endings,
        faults,
        hand_rules,
        rho_lead,
        synthetic,
        tail_price,
        verdicts,
    )

    started = time.monotonic()
    runs = fc.corpus(args.corpus_path or fc.DEFAULT_PATH, rebuild=args.rebuild, jobs=args.jobs)
    real_steps = sum(len(r.records) for r in runs)
    print(
        f"failure corpus: {len(runs)} real runs, {real_steps} steps "
        f"({', '.join(sorted({r.name for r in runs}))})"
    )
    print()
    print("real runs (HF Trainer SFT, the demo's GRPO loop, TRL's GRPOTrainer):")
    outcomes, false, healthy, rules = verdicts.evaluate(runs)
    goals = verdicts.report(
        outcomes, false, healthy, watched=faults.watched_steps(runs), rules=rules
    )
    entropy_definitions(runs)
    print(endings.endings_line(e for r in runs for e in endings.endings(r)))
    print()
    hand_rules.holdout_hand_rules(runs)
    print()
    syn = synthetic.synthetic_corpus(args.syn_trials, args.syn_healthy_steps, rng)
    print(
        f"synthetic streams: {args.syn_trials} trials of {len(synthetic.SYNTHETIC_FAULTS)} rare "
        f"shapes, {args.syn_healthy_steps} healthy RL-like steps (heavy-tailed noise, trends, "
        "wander):"
    )
    s_outcomes, s_false, s_healthy, s_rules = verdicts.evaluate(syn)
    s_goals = verdicts.report(
        s_outcomes,
        s_false,
        s_healthy,
        say=_quiet_faults(),
        watched=faults.watched_steps(syn),
        rules=s_rules,
    )
    print(endings.endings_line(e for r in syn for e in endings.endings(r)))
    print()
    unseen = synthetic.synthetic_corpus(args.syn_trials, args.syn_healthy_steps, rng)
    hand_rules.holdout_synthetic(s_rules, s_false, unseen)
    hand_rules.spike_rules_on(s_rules, [faults.healthy_part(r) for r in runs], false)
    if args.syn_seeds:
        print("the synthetic section on other draws (goals: budget / false alarms / hand rules):")
        for seed in args.syn_seeds:
            print(
                verdicts.draw_line(
                    verdicts.summarise_draw(seed, args.syn_trials, args.syn_healthy_steps)
                )
            )
    print("a one-record path as early as a hand rule, priced on the real corpus:")
    for det, rule in (("LossSpike", "static"), ("GradNormSpike", "static"), ("KLSurge", "spike")):
        if tail_price.one_record_cost(s_rules, syn, runs, det, rule=rule) is None:
            label = "static" if rule == "static" else "running-mean"
            print(f"  {det}: the {label} rule caught no synthetic fault on its onset record")
    print()
    rho_lead.rho_lead(runs)
    print(f"\n({time.monotonic() - started:.0f} s)")
    return {k: v and s_goals[k] for k, v in goals.items()}


def entropy_definitions(runs: list[CorpusRun], say: Callable[[str], None] = print) -> None:
    """EntropyCollapse on the entropy-collapse fault (samples at temperature 0.3) read two ways:
    the entropy of the distribution the tokens were sampled from (logits / temperature: what
    TRL's GRPOTrainer logs and the GRPO loop sends), which falls on the onset record because
    the temperature fell, and the model's own (temperature 1), whose slower fall is the
    collapse itself (its first records are within a healthy run's wander)."""
    from benchmarks.detection import faults
    from benchmarks.failure_corpus import CorpusRun

    for run in runs:
        records = run.records
        if run.fault != "entropy_collapse" or run.onset is None:
            continue
        if any(r.get("policy_entropy_unscaled") is None for r in records):
            continue
        own = CorpusRun(
            run.name,
            run.family,
            run.fault,
            run.onset,
            run.seed,
            [{**r, "policy_entropy_mean": r["policy_entropy_unscaled"]} for r in records],
        )
        for label, r in (("sampled (logits / T)", run), ("the model's own (T = 1)", own)):
            starts = faults.detector_starts(r).get("EntropyCollapse", [])
            say(
                f"  {run.name}: EntropyCollapse on the entropy {label}: "
                f"{faults.first_after(starts, run.onset)} records after the onset"
            )


def _quiet_faults() -> Callable[[str], None]:
    """Print the synthetic report without its one line per fault run (hundreds)."""

    def say(line: str) -> None:
        if not line.startswith("  syn-"):
            print(line)

    return say


if __name__ == "__main__":
    main()
