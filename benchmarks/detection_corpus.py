"""The training-health detectors on the failure corpus and on synthetic streams, against the
rules users write by hand today (``bench_detection.py --corpus`` prints it).

For every fault: the delay (records after the onset) of each detector that
should catch it, against its budget (NonFiniteTraining 0; spikes, entropy
collapse or surge, KL surge 3; reward collapse, length drift 5). False alarms:
alerts started on healthy records (healthy runs, and fault runs before their
onset), per 10,000. Side by side on the same streams, two hand rules per
detector, each calibrated to the same false-alarm count on the same healthy
records (the loosest setting that raises no more false alarms than the
detector): a static threshold ("metric crosses X", as W&B Automations; X the
most extreme healthy value of the family) and a running-mean spike rule
(value > m x the mean of the last 10 values, as Lightning's SpikeDetection and
llm-foundry's loss-spike callback; the smallest m on a grid that keeps the
false alarms equal; ``1/m`` for a fall).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig, Observation, RunDetectors
from inversion_monitor.server.detectors.robust import DriftConfig, RobustStream, Score, times

BUDGET = {
    "NonFiniteTraining": 0,
    "LossSpike": 3,
    "GradNormSpike": 3,
    "EntropyCollapse": 3,
    "EntropySurge": 3,
    "KLSurge": 3,
    "RewardCollapse": 5,
    "LengthDrift": 5,
}
# the field each detector reads and the direction of its fault (hand rules use the same)
SIGNAL = {
    "NonFiniteTraining": ("grad_norm", "nonfinite"),
    "LossSpike": ("loss", "up"),
    "GradNormSpike": ("grad_norm", "up"),
    "EntropyCollapse": ("policy_entropy_mean", "down"),
    "EntropySurge": ("policy_entropy_mean", "up"),
    "KLSurge": ("kl", "up"),
    "RewardCollapse": ("reward_mean", "down"),
    "LengthDrift": ("completion_length_mean", "both"),
}
# the detectors that answer a fault (it is caught when one of them fires within its budget)
EXPECTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("sft", "lr_jump"): ("LossSpike", "GradNormSpike"),
    ("sft", "nan_batch"): ("NonFiniteTraining",),
    ("sft", "label_corruption"): ("LossSpike",),
    ("rl", "lr_jump"): (
        "EntropyCollapse",
        "EntropySurge",
        "RewardCollapse",
        "KLSurge",
        "GradNormSpike",
    ),
    ("rl", "zero_reward"): ("RewardCollapse",),
    ("rl", "length_hack"): ("LengthDrift",),
    ("rl", "entropy_collapse"): ("EntropyCollapse",),
    ("trl", "zero_reward"): ("RewardCollapse",),
    ("trl", "lr_jump"): (
        "EntropyCollapse",
        "EntropySurge",
        "RewardCollapse",
        "KLSurge",
        "GradNormSpike",
    ),
    ("trl", "nan_batch"): ("NonFiniteTraining",),
    # synthetic rare shapes
    ("syn", "inf_loss"): ("NonFiniteTraining",),
    ("syn", "grad_spikes_growing"): ("GradNormSpike",),
    ("syn", "kl_surge"): ("KLSurge",),
    ("syn", "length_collapse"): ("LengthDrift",),
    ("syn", "entropy_surge"): ("EntropySurge",),
    ("syn", "entropy_drop"): ("EntropyCollapse",),
    ("syn", "reward_slide"): ("RewardCollapse",),
    ("syn", "loss_step"): ("LossSpike",),
}
HAND_WINDOW = 10
# a fault that is a pattern exists only from its second event: growing grad-norm spikes
# (x3, x7, x11 every 4 records) grow from the second spike; a lone first spike x3 is within a
# healthy run's noise (healthy corpus runs show lone grad-norm records 10x their level)
PATTERN_LAG = {"grad_spikes_growing": 4}
_LAG_WHY = "its second spike: growth exists from there; the raw delay is printed"


# a fault counts for a detector only where it moved the detector's signal: within the
# detector's budget after the onset, a value MOVED x (or 1/MOVED x, for a fall) its median
# before the onset, or non-finite. A learning-rate jump need not move every signal: TRL's
# took the reward from 0.375 to 0.322 for one record (0.86 x), no collapse to catch.
MOVED = 1.5
# a second signal a detector reads (LengthDrift's joint path: the reward rising with the
# length): the fault counts where either moved. A reward that pays for length doubles the
# reward at once while the length climbs over several records (the second build's hack:
# 1.5 x its level only on its sixth record, past the budget)
ALSO_READS = {"LengthDrift": ("reward_mean", "up")}


def signal_moved(run: CorpusRun, det: str) -> bool:
    """Whether the fault moved ``det``'s signal (or the one :data:`ALSO_READS` names) past
    :data:`MOVED` x its pre-onset median within the detector's budget (True where no ratio
    can tell: a signed or absent level)."""
    if run.onset is None:
        return False
    signals = [SIGNAL[det], *([ALSO_READS[det]] if det in ALSO_READS else [])]
    return any(_moved(run, name, direction, BUDGET[det]) for name, direction in signals)


def _moved(run: CorpusRun, name: str, direction: str, budget: int) -> bool:
    onset = run.onset or 0
    before = [
        v
        for r in run.records
        if (r["step"] or 0) < onset and (v := r.get(name)) is not None and math.isfinite(v)
    ]
    after = [
        v
        for r in run.records
        if onset <= (r["step"] or 0) <= onset + budget and (v := r.get(name)) is not None
    ]
    level = statistics.median(before) if before else 0.0
    if direction == "nonfinite" or level <= 0.0:
        return True
    for v in after:
        up, down = v >= MOVED * level, v <= level / MOVED
        if not math.isfinite(v) or (direction == "up" and up) or (direction == "down" and down):
            return True
        if direction == "both" and (up or down):
            return True
    return False


def observations(run: CorpusRun) -> list[Observation]:
    """The detectors' inputs of each record (non-finite values named, as on the wire)."""
    out = []
    for r in run.records:
        values = {k: r.get(k) for k in ("loss", "grad_norm", "reward_mean", "kl")}
        bad = tuple(k for k, v in values.items() if v is not None and not math.isfinite(v))
        n = r.get("n")
        out.append(
            Observation(
                int(r["step"] or 0),
                float(r["step"] or 0),
                r.get("rho"),
                int(n) if n is not None else 0,
                r.get("entropy_mean"),
                r.get("reward_mean"),
                r.get("policy_entropy_mean"),
                loss=r.get("loss"),
                learning_rate=r.get("learning_rate"),
                reward_std=r.get("reward_std"),
                grad_norm=r.get("grad_norm"),
                kl=r.get("kl"),
                completion_length_mean=r.get("completion_length_mean"),
                nonfinite_fields=bad,
            )
        )
    return out


def _kind(run: CorpusRun) -> str:
    return "rl" if run.family in ("rl", "trl", "syn-rl") else "sft" if run.family == "sft" else ""


def detector_starts(run: CorpusRun, config: AlertsConfig | None = None) -> dict[str, list[int]]:
    """Steps at which each alert started on the run (detectors of the run's kind)."""
    dets = RunDetectors(config or AlertsConfig(), _kind(run))
    starts: dict[str, list[int]] = {}
    for obs in observations(run):
        for t in dets.update(obs):
            if t.firing:
                starts.setdefault(t.name.value, []).append(obs.step)
    return starts


# ---------------------------------------------------------------- hand rules


def _values(run: CorpusRun, name: str) -> list[tuple[int, float | None]]:
    return [(int(r["step"] or 0), r.get(name)) for r in run.records]


def static_starts(run: CorpusRun, name: str, direction: str, x: float) -> list[int]:
    """Steps where the value crosses ``x`` (down: falls below; up, and both, as one level can
    only watch one side: rises above)."""
    out, over = [], False
    below = direction == "down"
    for step, v in _values(run, name):
        if v is None:
            continue
        now = (v < x) if below else (v > x)  # NaN: False, as in a comparison
        if now and not over:
            out.append(step)
        over = now
    return out


def spike_starts(run: CorpusRun, name: str, direction: str, m: float) -> list[int]:
    """Steps where the value leaves ``m`` x (or 1/m x) the mean of its last 10 values."""
    out, over = [], False
    recent: list[float] = []
    for step, v in _values(run, name):
        if v is None:
            continue
        now = False
        if len(recent) >= HAND_WINDOW:
            mean = sum(recent[-HAND_WINDOW:]) / HAND_WINDOW
            up = v > m * mean
            down = v < mean / m
            now = up if direction == "up" else down if direction == "down" else up or down
        if now and not over:
            out.append(step)
        over = now
        if math.isfinite(v):
            recent.append(v)
    return out


def _false(starts: Iterable[int], onset: int | None) -> int:
    return sum(1 for s in starts if onset is None or s < onset)


def healthy_part(run: CorpusRun) -> CorpusRun:
    """The run's healthy records: all of a healthy run, a fault run's before its onset."""
    if run.onset is None:
        return run
    records = [r for r in run.records if (r["step"] or 0) < run.onset]
    return CorpusRun(run.name, run.family, None, None, run.seed, records)


def _after_warmup(starts: Iterable[int], run: CorpusRun, warmup: int) -> int:
    """Alert starts after the run's first ``warmup`` records (the detectors' warm-up)."""
    if len(run.records) <= warmup:
        return 0
    first = int(run.records[warmup - 1]["step"] or 0) if warmup else -1
    return sum(1 for x in starts if x > first)


def rule_false(
    runs: Iterable[CorpusRun], name: str, direction: str, rule: str, x: float, *, warmup: int
) -> int:
    """The alarms a hand rule (``rule`` ``"static"`` at level ``x``, or ``"spike"`` at
    multiplier ``x``) starts on ``name`` over ``runs``, after each run's first ``warmup``
    records (the detectors' warm-up)."""
    starts_of = static_starts if rule == "static" else spike_starts
    return sum(_after_warmup(starts_of(r, name, direction, x), r, warmup) for r in runs)


@dataclass
class HandRules:
    """A static threshold and a spike multiplier per detector, calibrated on healthy records."""

    static: dict[str, float] = field(default_factory=dict)
    spike: dict[str, float] = field(default_factory=dict)
    # the false alarms each rule raised on the healthy records it was calibrated on
    static_false: dict[str, int] = field(default_factory=dict)
    spike_false: dict[str, int] = field(default_factory=dict)


# spike multipliers tried, 1.01 to 100 (geometric, 1% apart)
SPIKE_GRID = tuple(float(round(1.01**i, 6)) for i in range(1, 464))


def calibrate(healthy: Sequence[CorpusRun], allowed: dict[str, int], warmup: int = 12) -> HandRules:
    """The most sensitive hand rules that raise no more false alarms than ``allowed`` (per
    detector) on the ``healthy`` streams, counted after the first ``warmup`` records of each
    (the detectors' own warm-up): the static level X is the lowest (highest, for a fall)
    healthy value it may sit at, the spike multiplier the smallest on :data:`SPIKE_GRID`."""
    rules = HandRules()
    for det, (name, direction) in SIGNAL.items():
        if direction == "nonfinite":
            continue
        values = sorted(
            v
            for run in healthy
            for v in [r.get(name) for r in run.records[warmup:]]
            if v is not None and math.isfinite(v)
        )
        if not values:
            continue
        budget = allowed.get(det, 0)
        sign = -1.0 if direction == "down" else 1.0

        def static_fa(x: float, name: str = name, direction: str = direction) -> int:
            return rule_false(healthy, name, direction, "static", x, warmup=warmup)

        # candidate levels, most extreme first: just past each healthy value
        top = values[::-1] if sign > 0 else values
        levels = [v * (1 + sign * 1e-9) + sign * 1e-12 for v in top]
        lo, hi = 0, len(levels) - 1  # levels[0] raises none; find the last within budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if static_fa(levels[mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        rules.static[det] = levels[lo]
        rules.static_false[det] = static_fa(levels[lo])
        if values[0] <= 0.0:
            continue  # a signed value has no ratio to its mean

        def spike_fa(m: float, name: str = name, direction: str = direction) -> int:
            return rule_false(healthy, name, direction, "spike", m, warmup=warmup)

        # false alarms fall as m grows: bisect the grid for the smallest m allowed
        lo, hi = 0, len(SPIKE_GRID)
        while lo < hi:
            mid = (lo + hi) // 2
            if spike_fa(SPIKE_GRID[mid]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if lo < len(SPIKE_GRID):
            rules.spike[det] = SPIKE_GRID[lo]
            rules.spike_false[det] = spike_fa(SPIKE_GRID[lo])
    return rules


def watched_steps(runs: Sequence[CorpusRun], config: AlertsConfig | None = None) -> dict[str, int]:
    """Per detector, the healthy records it judged: of a run kind it is set up for, with its
    value present (finite or not: a non-finite value is judged too)."""
    config = config or AlertsConfig()
    out: dict[str, int] = {}
    for run in runs:
        kind = _kind(run)
        dets = {type(d).__name__ for d in RunDetectors(config, kind).detectors}
        for det, (name, _) in SIGNAL.items():
            if det not in dets:
                continue
            fields = (
                ("loss", "grad_norm", "reward_mean")
                if det == "NonFiniteTraining"
                else ((name, "entropy_mean") if det == "EntropySurge" else (name,))
            )
            out[det] = out.get(det, 0) + sum(
                1 for r in healthy_part(run).records if any(r.get(f) is not None for f in fields)
            )
    return out


# ---------------------------------------------------------------- evaluation


def _earliest(delays: Iterable[int | None]) -> int | None:
    got = [d for d in delays if d is not None]
    return min(got) if got else None


def first_after(starts: Iterable[int], onset: int) -> int | None:
    after = [s - onset for s in starts if s >= onset]
    return min(after) if after else None


@dataclass
class Outcome:
    run: str
    fault: str
    detector: str
    delay: int | None  # None: never fired after the onset
    static: int | None
    spike: int | None


def evaluate(
    runs: Sequence[CorpusRun], config: AlertsConfig | None = None
) -> tuple[list[Outcome], dict[str, int], int, HandRules]:
    """Delays on the fault runs, false alarms on healthy records, hand rules side by side
    (calibrated in sample: on the same healthy records of the family, to the detector's own
    false-alarm count there)."""
    starts = {run.name: detector_starts(run, config) for run in runs}
    false: dict[str, int] = {}
    healthy_steps = 0
    for run in runs:
        healthy_steps += len(healthy_part(run).records)
        for det, ss in starts[run.name].items():
            false[det] = false.get(det, 0) + _false(ss, run.onset)
    outcomes: list[Outcome] = []
    rules_by_family: dict[str, HandRules] = {}
    for family in sorted({r.family for r in runs}):
        healthy = [healthy_part(r) for r in runs if r.family == family]
        fam_false: dict[str, int] = {}
        for run in (r for r in runs if r.family == family):
            for det, ss in starts[run.name].items():
                fam_false[det] = fam_false.get(det, 0) + _false(ss, run.onset)
        rules_by_family[family] = calibrate(healthy, fam_false)
    for run in runs:
        if run.fault is None or run.onset is None:
            continue
        key = ("syn" if run.family.startswith("syn") else run.family, run.fault)
        rules = rules_by_family[run.family]
        for det in EXPECTED[key]:
            if not signal_moved(run, det):
                continue
            name, direction = SIGNAL[det]
            static = spike = None
            if direction == "nonfinite":
                # "loss > X" or "grad norm > X": true for +inf, false for NaN (a comparison)
                static = _earliest(
                    first_after(static_starts(run, n, "up", 1e30), run.onset)
                    for n in ("loss", "grad_norm")
                )
                spike = _earliest(
                    first_after(spike_starts(run, n, "up", 1e30), run.onset)
                    for n in ("loss", "grad_norm")
                )
            else:
                if det in rules.static:
                    static = first_after(
                        static_starts(run, name, direction, rules.static[det]), run.onset
                    )
                if det in rules.spike:
                    spike = first_after(
                        spike_starts(run, name, direction, rules.spike[det]), run.onset
                    )
            outcomes.append(
                Outcome(
                    run.name,
                    run.fault,
                    det,
                    first_after(starts[run.name].get(det, []), run.onset),
                    static,
                    spike,
                )
            )
    merged = HandRules()
    for fam, rules in rules_by_family.items():
        merged.static.update({f"{fam}:{k}": v for k, v in rules.static.items()})
        merged.spike.update({f"{fam}:{k}": v for k, v in rules.spike.items()})
        for k, v in rules.static_false.items():
            merged.static_false[k] = merged.static_false.get(k, 0) + v
        for k, v in rules.spike_false.items():
            merged.spike_false[k] = merged.spike_false.get(k, 0) + v
    return outcomes, false, healthy_steps, merged


def _fmt(delays: list[int | None]) -> str:
    fired = [d for d in delays if d is not None]
    misses = len(delays) - len(fired)
    if not fired:
        return f"{'-':>5} {'-':>5} {misses:>5}"
    return f"{statistics.median(fired):>5.1f} {max(fired):>5d} {misses:>5d}"


def _later(mine: int | None, hand: int | None) -> bool:
    """Whether a hand rule caught the fault before the detector (or caught what it missed)."""
    return hand is not None and (mine is None or hand < mine)


def hand_first(outcomes: Sequence[Outcome]) -> list[tuple[Outcome, str, int]]:
    """The outcomes where a hand rule caught the fault before the detector (or caught what it
    missed): (the outcome, ``"static"`` or ``"spike"``, the rule's delay), in
    :data:`BUDGET`'s order of detectors."""
    out: list[tuple[Outcome, str, int]] = []
    for det in BUDGET:
        for o in outcomes:
            if o.detector != det:
                continue
            for rule, hand in (("static", o.static), ("spike", o.spike)):
                if hand is not None and _later(o.delay, hand):
                    out.append((o, rule, hand))
    return out


def fault_verdicts(
    outcomes: Sequence[Outcome],
) -> dict[tuple[str, str], tuple[bool, list[Outcome]]]:
    """Per fault run (run, fault): whether one of its detectors caught it within that
    detector's budget (from record :data:`PATTERN_LAG` after the onset where the fault's shape
    takes that long to exist), and its outcomes."""
    by_fault: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        by_fault.setdefault((o.run, o.fault), []).append(o)
    return {
        (run, fault): (
            any(
                o.delay is not None and o.delay <= BUDGET[o.detector] + PATTERN_LAG.get(fault, 0)
                for o in os_
            ),
            os_,
        )
        for (run, fault), os_ in by_fault.items()
    }


def report(
    outcomes: Sequence[Outcome],
    false: dict[str, int],
    healthy_steps: int,
    say: Callable[[str], None] = print,
    *,
    watched: dict[str, int] | None = None,
    rules: HandRules | None = None,
) -> dict[str, bool]:
    """Per detector: delays, misses, false alarms per 10k of the healthy steps it judged
    (``watched``; all ``healthy_steps`` when not given); the hand rules at an equal false-alarm
    count (``rules``: the counts they reached); the goals met."""
    header = (
        f"{'detector':<18} {'budget':>6} {'faults':>6} {'med':>5} {'worst':>5} {'miss':>5}"
        f" {'FA':>3} {'steps':>6} {'FA/10k':>6}   {'static med worst miss FA':>24}"
        f"   {'spike med worst miss FA':>23}"
    )
    say(header)
    say("-" * len(header))
    within = True
    for det, budget in BUDGET.items():
        mine = [o for o in outcomes if o.detector == det]
        if not mine:
            continue
        delays = [o.delay for o in mine]
        steps = (watched or {}).get(det, healthy_steps)
        fa = false.get(det, 0) * 10_000 / max(1, steps)
        sfa = _hand_false(rules.static_false if rules else {}, det)
        pfa = _hand_false(rules.spike_false if rules else {}, det)
        say(
            f"{det:<18} {budget:>6} {len(mine):>6} {_fmt(delays)} {false.get(det, 0):>3}"
            f" {steps:>6} {fa:>6.2f}   {_fmt([o.static for o in mine]):>17} {sfa:>6}"
            f"   {_fmt([o.spike for o in mine]):>17} {pfa:>5}"
        )
    hand_wins = [
        f"{o.run} {o.detector}: {o.delay if o.delay is not None else 'miss'} vs {rule} {hand}"
        for o, rule, hand in hand_first(outcomes)
    ]
    earlier = not hand_wins
    say("")
    say("per fault (caught: one of its detectors within that detector's budget; records):")
    tally: dict[str, list[int]] = {}
    for (run, fault), (ok, os_) in fault_verdicts(outcomes).items():
        within = within and ok
        counts = tally.setdefault(fault, [0, 0])
        counts[0] += ok
        counts[1] += 1
        parts = ", ".join(
            f"{o.detector} {o.delay if o.delay is not None else 'miss'}"
            f" (static {o.static if o.static is not None else 'miss'},"
            f" spike {o.spike if o.spike is not None else 'miss'})"
            for o in os_
        )
        say(f"  {run:<32} {'ok ' if ok else 'LATE'} {parts}")
    say(
        "caught within budget: "
        + ", ".join(f"{fault} {ok}/{n}" for fault, (ok, n) in sorted(tally.items()))
    )
    for fault, lag in PATTERN_LAG.items():
        if fault in tally:
            say(f"  ({fault}: its budget counts from record {lag} after the onset, {_LAG_WHY})")
    if hand_wins:
        say(f"a hand rule at the detector's false-alarm count came first ({len(hand_wins)}):")
        for line in hand_wins:
            say(f"  {line}")
    total_fa = sum(false.values()) * 10_000 / max(1, healthy_steps)
    goals = {
        "every fault caught within budget": within,
        "<= 1 false alarm per 10k healthy steps (each detector)": all(
            v * 10_000 / max(1, (watched or {}).get(det, healthy_steps)) <= 1.0
            for det, v in false.items()
        ),
        "never later than a hand rule at equal false alarms": earlier,
    }
    say(f"false alarms on {healthy_steps} healthy steps: {dict(sorted(false.items()))}")
    say(f"  = {total_fa:.2f} per 10k steps, all detectors together")
    for goal, met in goals.items():
        say(f"goal: {goal}: {'yes' if met else 'NO'}")
    return goals


@dataclass
class DrawSummary:
    """One synthetic draw's verdict in short (:func:`summarise_draw`)."""

    seed: int
    goals: dict[str, bool]
    late: list[str]  # fault runs no detector caught within its budget
    worst_false: tuple[str, float]  # the detector with the most false alarms, per 10k
    hand_first: dict[str, int]  # per detector, the lines where a hand rule came first


def summarise_draw(
    seed: int, trials: int, healthy_steps: int, config: AlertsConfig | None = None
) -> DrawSummary:
    """The synthetic section on the draw of ``seed`` (the benchmark's own is ``--seed``, 0),
    reduced to its goals, its late faults, its worst false-alarm rate and its hand-rule
    lines by detector: one draw's verdict rides on a few records near a gate, so the
    benchmark can show several."""
    runs = synthetic_corpus(trials, healthy_steps, np.random.default_rng(seed))
    outcomes, false, healthy, rules = evaluate(runs, config)
    watched = watched_steps(runs, config)
    goals = report(outcomes, false, healthy, say=lambda _: None, watched=watched, rules=rules)
    late = [
        f"{run} "
        + ", ".join(f"{o.detector} {o.delay if o.delay is not None else 'miss'}" for o in os_)
        for (run, _), (ok, os_) in fault_verdicts(outcomes).items()
        if not ok
    ]
    by_detector: dict[str, int] = {}
    for o, _, _ in hand_first(outcomes):
        by_detector[o.detector] = by_detector.get(o.detector, 0) + 1
    rates = {d: v * 10_000 / max(1, watched.get(d, healthy)) for d, v in false.items()}
    worst = max(rates.items(), key=lambda kv: kv[1]) if rates else ("-", 0.0)
    return DrawSummary(seed, goals, late, worst, by_detector)


def draw_line(summary: DrawSummary) -> str:
    """:class:`DrawSummary` as the benchmark prints it."""
    verdict = " / ".join("yes" if v else "NO" for v in summary.goals.values())
    late = f" (late: {', '.join(summary.late)})" if summary.late else ""
    first = ", ".join(f"{d} {n}" for d, n in sorted(summary.hand_first.items())) or "none"
    det, rate = summary.worst_false
    worst = f"{det} {rate:.2f} per 10k" if rate > 0.0 else "none"
    return (
        f"  seed {summary.seed}: {verdict}{late}; most false alarms: {worst}; "
        f"hand rule first: {first}"
    )


def _hand_false(counts: dict[str, int], det: str) -> str:
    got = [v for k, v in counts.items() if k == det or k.endswith(f":{det}")]
    return str(sum(got)) if got else "-"


# ---------------------------------------------------------------- synthetic streams


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


# ---------------------------------------------------------------- rho's lead or lag


def first_move(values: Sequence[float | None], onset_index: int, z: float = 3.0) -> int | None:
    """Records after the onset until a value is ``z`` robust SDs from its pre-onset level."""
    before = [v for v in values[5:onset_index] if v is not None and math.isfinite(v)]
    if len(before) < 5:
        return None
    med = statistics.median(before)
    mad = statistics.median(abs(v - med) for v in before) * 1.4826 or 1e-9
    for i, v in enumerate(values[onset_index:]):
        if v is not None and (not math.isfinite(v) or abs(v - med) / mad > z):
            return i
    return None


def rho_lead(runs: Sequence[CorpusRun], say: Callable[[str], None] = print) -> None:
    """For each RL fault: records until rho, the reward and the policy entropy first move."""
    rl = [r for r in runs if r.family == "rl" and r.fault is not None and r.onset is not None]
    if not rl or all(r.records[0].get("rho") is None for r in rl):
        say("rho's lead or lag: the corpus has no probe records (not measured)")
        return
    say("rho's lead or lag (records after the onset until the value is 3 robust SDs from its")
    say("pre-onset level; the probe ran on every step, 128 tokens):")
    for run in rl:
        steps = [int(r["step"] or 0) for r in run.records]
        onset_index = steps.index(run.onset) if run.onset in steps else len(steps)
        moves = {
            name: first_move([r.get(name) for r in run.records], onset_index)
            for name in ("rho", "reward_mean", "policy_entropy_mean")
        }
        text = ", ".join(f"{k} {v if v is not None else 'never'}" for k, v in moves.items())
        say(f"  {run.name:<28} {text}")


# ---------------------------------------------------------------- hand rules out of sample


def holdout_hand_rules(
    runs: Sequence[CorpusRun],
    config: AlertsConfig | None = None,
    say: Callable[[str], None] = print,
    warmup: int = 12,
) -> None:
    """The hand rules fitted on half the healthy runs of each family (the lower seeds) and
    judged on the other half, next to the detectors there: a threshold fitted after the fact
    to the runs it is judged on has no false alarm by construction; on runs it has not seen,
    it pays for its earliness in false alarms (the detectors fit nothing across runs)."""
    say("hand rules fitted on the lower half of the healthy seeds, judged on the upper half")
    say(f"(false alarms after the first {warmup} records of each run):")
    say(
        f"  {'family':<7} {'detector':<18} {'seen':>4} {'unseen steps':>12} {'FA: detector':>13}"
        f" {'static':>6} {'spike':>5}"
    )
    for family in sorted({r.family for r in runs}):
        healthy = sorted(
            (r for r in runs if r.family == family and r.fault is None), key=lambda r: r.seed
        )
        if len(healthy) < 2:
            continue
        seen, unseen = healthy[: len(healthy) // 2], healthy[len(healthy) // 2 :]
        ours = {r.name: detector_starts(r, config) for r in unseen}
        allowed = {
            det: sum(
                len(ss) for r in seen for d, ss in detector_starts(r, config).items() if d == det
            )
            for det in SIGNAL
        }
        rules = calibrate(seen, allowed)
        steps = sum(len(r.records) for r in unseen)

        for det, (name, direction) in SIGNAL.items():
            if det not in rules.static:
                continue
            static = rule_false(unseen, name, direction, "static", rules.static[det], warmup=warmup)
            spike = (
                rule_false(unseen, name, direction, "spike", rules.spike[det], warmup=warmup)
                if det in rules.spike
                else None
            )
            mine = sum(len(ours[r.name].get(det, [])) for r in unseen)
            say(
                f"  {family:<7} {det:<18} {len(seen):>4} {steps:>12} {mine:>13} {static:>6}"
                f" {spike if spike is not None else '-':>5}"
            )


# ---------------------------------------------------------------- synthetic hand rules unseen


def holdout_synthetic(
    rules: HandRules,
    false_seen: dict[str, int],
    unseen: Sequence[CorpusRun],
    *,
    config: AlertsConfig | None = None,
    say: Callable[[str], None] = print,
    warmup: int = 12,
) -> dict[str, tuple[int, int, int | None]]:
    """The synthetic section's hand rules (``rules``, calibrated by :func:`evaluate` on the
    healthy records of one draw to the detectors' false-alarm counts there, ``false_seen``)
    judged on ``unseen``: a second draw of the same law. Per detector: (its false alarms on
    ``unseen``, the static rule's, the spike rule's or None); printed next to the in-sample
    counts."""
    healthy = [healthy_part(r) for r in unseen]
    ours: dict[str, int] = {}
    for run in unseen:
        for det, ss in detector_starts(run, config).items():
            ours[det] = ours.get(det, 0) + _false(ss, run.onset)
    say(
        "hand rules fitted on this synthetic draw, judged on a second draw of the same law "
        f"({sum(len(r.records) for r in healthy)} healthy steps; false alarms after the first "
        f"{warmup} records of each run):"
    )
    say(
        f"  {'detector':<18} {'in sample: detector':>19} {'static':>6} {'spike':>5}"
        f"   {'unseen: detector':>16} {'static':>6} {'spike':>5}"
    )
    out: dict[str, tuple[int, int, int | None]] = {}
    for det, (name, direction) in SIGNAL.items():
        key = next((k for k in rules.static if k.endswith(f":{det}")), None)
        if key is None:
            continue
        static = rule_false(healthy, name, direction, "static", rules.static[key], warmup=warmup)
        spike = (
            rule_false(healthy, name, direction, "spike", rules.spike[key], warmup=warmup)
            if key in rules.spike
            else None
        )
        out[det] = (ours.get(det, 0), static, spike)
        say(
            f"  {det:<18} {false_seen.get(det, 0):>19} {rules.static_false.get(det, 0):>6}"
            f" {rules.spike_false.get(det, '-')!s:>5}   {ours.get(det, 0):>16} {static:>6}"
            f" {spike if spike is not None else '-':>5}"
        )
    return out


def spike_rules_on(
    rules: HandRules,
    healthy: Sequence[CorpusRun],
    false_ours: dict[str, int],
    *,
    say: Callable[[str], None] = print,
    warmup: int = 12,
) -> dict[str, int]:
    """The synthetic section's running-mean rules (``rules``; a multiplier, so it means the
    same on any stream's scale) on the real corpus' ``healthy`` records: per detector, the
    false alarms the rule raises there (after the first ``warmup`` records of each run),
    printed next to the detector's own (``false_ours``). A rule that came before a detector
    on the synthetic law and raises more here owes its lead to that law's quieter streams."""
    out: dict[str, int] = {}
    for key, m in rules.spike.items():
        det = key.split(":", 1)[1]
        name, direction = SIGNAL[det]
        out[det] = rule_false(healthy, name, direction, "spike", m, warmup=warmup)
    say(
        "the synthetic section's running-mean rules on the real corpus' healthy records "
        "(false alarms: the rule's at its synthetic multiplier, the detector's):"
    )
    say(
        "  "
        + ", ".join(
            f"{det} {rules.spike[key]:.3g} x: {out[det]} ({false_ours.get(det, 0)})"
            for key in rules.spike
            for det in [key.split(":", 1)[1]]
        )
    )
    return out


def _detector_config(det: str, config: AlertsConfig | None) -> DriftConfig:
    config = config or AlertsConfig()
    cfg: DriftConfig = {
        "LossSpike": config.loss_spike,
        "GradNormSpike": config.grad_norm_spike,
        "KLSurge": config.kl_surge,
    }[det]
    return cfg


def stream_scores(
    run: CorpusRun, det: str, config: AlertsConfig | None = None
) -> tuple[list[Score | None], bool | None]:
    """Per record of ``run``, the score of the stream the detector ``det`` (LossSpike,
    GradNormSpike or KLSurge) judges its value with (None in its warm-up or without a finite
    value), and whether that stream scored the log (None: never out of the warm-up)."""
    stream = RobustStream(_detector_config(det, config))
    name = SIGNAL[det][0]
    out: list[Score | None] = []
    for r in run.records:
        v = r.get(name)
        out.append(stream.update(v) if v is not None and math.isfinite(v) else None)
    return out, stream.log


def level_ratios(
    scores: Sequence[Score | None], log: bool | None, floor: float
) -> list[float | None]:
    """Per score of a stream (:func:`stream_scores`), its value over the level in the value's
    own units (the stream's ``floor`` taken out, as an alert message gives it): the form of a
    running-mean rule. None where there is no score, the stream scores no log, or the level
    is 0."""
    out: list[float | None] = []
    for s in scores:
        level = s.level - floor if s is not None and log else 0.0
        out.append(s.value / level if s is not None and level > 0.0 else None)
    return out


def hill_tail(values: Sequence[float], at: float, k: int = 20) -> float | None:
    """How many of ``values`` a Pareto tail fitted to their ``k`` largest (Hill's estimator of
    its index) puts at ``at`` or above: the expected count in a sample of the same size past
    a point the sample may not reach. None with fewer than ``k + 1`` positive values, or
    ``at`` not past the ``k + 1``-th largest (count those instead).

    >>> pareto = [(1000 / (i - 0.5)) ** 0.5 for i in range(1, 1001)]  # 1000 x^-2 past x
    >>> round(max(pareto), 1), round(hill_tail(pareto, 50.0), 2)  # 1000 / 50^2 = 0.4
    (44.7, 0.4)
    """
    top = sorted((v for v in values if v > 0.0), reverse=True)
    if len(top) <= k or at <= top[k]:
        return None
    index = k / sum(math.log(v / top[k]) for v in top[:k])
    return float(k * (at / top[k]) ** -index)


def one_record_cost(
    rules: HandRules,
    synthetic: Sequence[CorpusRun],
    real: Sequence[CorpusRun],
    det: str,
    *,
    rule: str = "static",
    config: AlertsConfig | None = None,
    say: Callable[[str], None] = print,
) -> tuple[float, int, int] | None:
    """What catching the synthetic faults on the record a hand rule does would cost on the
    real corpus: the robust z (``det``'s own) of the records where the in-sample ``rule``
    (``"static"`` or ``"spike"``, the running-mean rule; ``rules``, from :func:`evaluate` on
    ``synthetic``) caught a synthetic fault on its onset record, and how many healthy real
    records (of runs ``det``'s stream scores on the same scale) are that far out or further.
    Returns (the lowest such z, real records at or past it, real records scored) or None."""
    fitted = rules.static if rule == "static" else rules.spike
    starts_of = static_starts if rule == "static" else spike_starts
    key = next((k for k in fitted if k.endswith(f":{det}")), None)
    if key is None:
        return None
    name, direction = SIGNAL[det]
    floor = _detector_config(det, config).floor
    caught: list[float] = []
    ratios: list[float] = []
    log: bool | None = None
    for run in synthetic:
        if run.onset is None or EXPECTED.get(("syn", run.fault or "")) != (det,):
            continue
        if first_after(starts_of(run, name, direction, fitted[key]), run.onset) != 0:
            continue
        at = [int(r["step"] or 0) for r in run.records].index(run.onset)
        scores, log = stream_scores(run, det, config)
        if scores[at] is not None:
            caught.append(scores[at].z)
        ratio = level_ratios(scores[at : at + 1], log, floor)[0]
        if ratio is not None:
            ratios.append(ratio)
    if not caught:
        return None
    low = min(caught)
    kind = "signed-loss " if log is False else ""
    past = scored = 0
    real_ratios: list[float] = []
    for run in real:
        scores, run_log = stream_scores(healthy_part(run), det, config)
        if run_log is not log:  # a signed loss against signed losses, a log against logs
            continue
        for score in scores:
            if score is not None:
                scored += 1
                past += score.z >= low
        if rule == "spike":
            real_ratios += [r for r in level_ratios(scores, run_log, floor) if r is not None]
    say(
        f"  {det}: the {'static' if rule == 'static' else 'running-mean'} rule caught "
        f"{len(caught)} synthetic faults on their onset record, "
        f"at robust z {low:+.1f} to {max(caught):+.1f}; a one-record rule at z {low:+.1f} would "
        f"fire on {past} of the real corpus' {scored} healthy {kind}records "
        f"({past * 10_000 / max(1, scored):.0f} per 10k)"
    )
    if ratios and real_ratios:
        say(ratio_cost_line(det, ratios, real_ratios))
    return low, past, scored


def ratio_cost_line(det: str, caught: Sequence[float], healthy: Sequence[float]) -> str:
    """The running-mean rule's own form, priced: the smallest ratio to the level among the
    synthetic onsets it ``caught``, the ``healthy`` real records at or past it and the largest
    of them, and where none is past it, the count a Pareto tail fitted to the 50 largest
    (:func:`hill_tail`) expects there, per 10k: what a one-record path at that ratio would add.
    On the failure corpus' KL that fit comes within ~15% of the counts from 5 x to 14 x its
    level (34, 23, 9, 5, 3, 2 of 9,765 records at 5, 6, 8, 10, 12, 14 x); a Student t (5
    degrees of freedom) on the log ratio, within ~20% of the counts from 3 x to 10 x, expects
    twice as many past 20 x."""
    low, n = min(caught), len(healthy)
    past = sum(1 for r in healthy if r >= low)
    top = sorted(healthy, reverse=True)[:2]
    line = (
        f"    as a ratio: the onsets were {times(low)} to {times(max(caught))} x {det}'s level "
        f"(in value units); {past} of the real corpus' {n} healthy records reach "
        f"{times(low)} x (the largest {', '.join(times(r) for r in top)} x)"
    )
    expected = hill_tail(healthy, low, k=50)
    if past == 0 and expected is not None:
        line += (
            f"; a Pareto tail fitted to the largest 50 expects {expected * 10_000 / n:.2f} per "
            f"10k there (what one record at that ratio firing at once would add)"
        )
    return line
