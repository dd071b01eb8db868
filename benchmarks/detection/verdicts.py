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

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.detection.faults import (
    BUDGET,
    LAG_WHY,
    PATTERN_LAG,
    SIGNAL,
    alarms_before,
    answering,
    detector_starts,
    earliest,
    first_after,
    healthy_part,
    signal_moved,
    watched_steps,
)
from benchmarks.detection.hand_rules import HandRules, calibrate, spike_starts, static_starts
from benchmarks.detection.synthetic import synthetic_corpus
from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig


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
            false[det] = false.get(det, 0) + alarms_before(ss, run.onset)
    outcomes: list[Outcome] = []
    rules_by_family: dict[str, HandRules] = {}
    for family in sorted({r.family for r in runs}):
        healthy = [healthy_part(r) for r in runs if r.family == family]
        fam_false: dict[str, int] = {}
        for run in (r for r in runs if r.family == family):
            for det, ss in starts[run.name].items():
                fam_false[det] = fam_false.get(det, 0) + alarms_before(ss, run.onset)
        rules_by_family[family] = calibrate(healthy, fam_false)
    for run in runs:
        if run.fault is None or run.onset is None:
            continue
        rules = rules_by_family[run.family]
        for det in answering(run):
            if not signal_moved(run, det):
                continue
            name, direction = SIGNAL[det]
            static = spike = None
            if direction == "nonfinite":
                # "loss > X" or "grad norm > X": true for +inf, false for NaN (a comparison)
                static = earliest(
                    first_after(static_starts(run, n, "up", 1e30), run.onset)
                    for n in ("loss", "grad_norm")
                )
                spike = earliest(
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
            say(f"  ({fault}: its budget counts from record {lag} after the onset, {LAG_WHY})")
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
