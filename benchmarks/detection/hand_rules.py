"""The rules users write by hand today, calibrated to a detector's false-alarm count on
healthy records: a static threshold ("metric crosses X", as W&B Automations) and a
running-mean spike rule (value > m x the mean of the last 10 values, as Lightning's
SpikeDetection and llm-foundry's loss-spike callback); and the same rules judged out of
sample (on healthy runs, or a synthetic draw, they were not fitted on)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from benchmarks.detection.faults import SIGNAL, alarms_before, detector_starts, healthy_part
from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig

HAND_WINDOW = 10


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


def after_warmup(starts: Iterable[int], run: CorpusRun, warmup: int) -> int:
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
    return sum(after_warmup(starts_of(r, name, direction, x), r, warmup) for r in runs)


@dataclass
class HandRules:
    """A static threshold and a spike multiplier per detector, calibrated on healthy records."""

    static: dict[str, float] = field(default_factory=dict)
    spike: dict[str, float] = field(default_factory=dict)
    # the false alarms each rule raised on the healthy records it was calibrated on
    static_false: dict[str, int] = field(default_factory=dict)
    spike_false: dict[str, int] = field(default_factory=dict)


def rules_false(
    runs: Iterable[CorpusRun], rules: HandRules, key: str, det: str, *, warmup: int
) -> tuple[int, int | None]:
    """The false alarms of ``rules``' static and spike rule under ``key`` (``det``, or
    ``"family:det"``) on ``runs`` (:func:`rule_false`); the spike's None where it has none."""
    runs = list(runs)
    name, direction = SIGNAL[det]
    static = rule_false(runs, name, direction, "static", rules.static[key], warmup=warmup)
    if key not in rules.spike:
        return static, None
    return static, rule_false(runs, name, direction, "spike", rules.spike[key], warmup=warmup)


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

        for det in SIGNAL:
            if det not in rules.static:
                continue
            static, spike = rules_false(unseen, rules, det, det, warmup=warmup)
            mine = sum(len(ours[r.name].get(det, [])) for r in unseen)
            say(
                f"  {family:<7} {det:<18} {len(seen):>4} {steps:>12} {mine:>13} {static:>6}"
                f" {spike if spike is not None else '-':>5}"
            )


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
            ours[det] = ours.get(det, 0) + alarms_before(ss, run.onset)
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
    for det in SIGNAL:
        key = next((k for k in rules.static if k.endswith(f":{det}")), None)
        if key is None:
            continue
        static, spike = rules_false(healthy, rules, key, det, warmup=warmup)
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
