"""What the detection benchmark judges: each detector's budget and signal, the detectors that
answer each fault, whether a fault moved a signal, and the detectors' alerts on a run, when
each started and ended (fed record by record, as the server feeds them)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig, Observation, RunDetectors

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


# a fault that is a pattern exists only from its second event: growing grad-norm spikes
# (x3, x7, x11 every 4 records) grow from the second spike; a lone first spike x3 is within a
# healthy run's noise (healthy corpus runs show lone grad-norm records 10x their level)
PATTERN_LAG = {"grad_spikes_growing": 4}
LAG_WHY = "its second spike: growth exists from there; the raw delay is printed"


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


def run_kind(run: CorpusRun) -> str:
    """The detectors' run kind of a corpus family: "rl" (the GRPO loop, TRL, synthetic), "sft"."""
    return "rl" if run.family in ("rl", "trl", "syn-rl") else "sft" if run.family == "sft" else ""


def answering(run: CorpusRun) -> tuple[str, ...]:
    """The detectors that answer ``run``'s fault (:data:`EXPECTED`; every synthetic family
    under ``"syn"``)."""
    family = "syn" if run.family.startswith("syn") else run.family
    return EXPECTED[(family, run.fault or "")]


def detector_spans(
    run: CorpusRun, config: AlertsConfig | None = None
) -> list[tuple[str, int, int | None]]:
    """Each alert on the run (detectors of the run's kind), in the order they started: its
    name, the step it started and the step it ended (None: still on at the run's end)."""
    dets = RunDetectors(config or AlertsConfig(), run_kind(run))
    spans: list[tuple[str, int, int | None]] = []
    on: dict[str, int] = {}  # an alert on: its index in ``spans``
    for obs in observations(run):
        for t in dets.update(obs):
            name = t.name.value
            if t.firing:
                on[name] = len(spans)
                spans.append((name, obs.step, None))
            elif name in on:
                i = on.pop(name)
                spans[i] = (name, spans[i][1], obs.step)
    return spans


def detector_starts(run: CorpusRun, config: AlertsConfig | None = None) -> dict[str, list[int]]:
    """Steps at which each alert started on the run (detectors of the run's kind)."""
    starts: dict[str, list[int]] = {}
    for name, start, _ in detector_spans(run, config):
        starts.setdefault(name, []).append(start)
    return starts


def robust_level(values: Sequence[float]) -> tuple[float, float]:
    """The median of ``values`` and their robust SD (1.4826 x the MAD; 0 where half of them
    are the median): what a value is judged against in robust SDs.

    >>> robust_level([1.0, 2.0, 4.0, 7.0, 11.0])
    (4.0, 4.4478)
    """
    med = statistics.median(values)
    return med, statistics.median(abs(v - med) for v in values) * 1.4826


def alarms_before(starts: Iterable[int], onset: int | None) -> int:
    return sum(1 for s in starts if onset is None or s < onset)


def healthy_part(run: CorpusRun) -> CorpusRun:
    """The run's healthy records: all of a healthy run, a fault run's before its onset."""
    if run.onset is None:
        return run
    records = [r for r in run.records if (r["step"] or 0) < run.onset]
    return CorpusRun(run.name, run.family, None, None, run.seed, records)


def watched_steps(runs: Sequence[CorpusRun], config: AlertsConfig | None = None) -> dict[str, int]:
    """Per detector, the healthy records it judged: of a run kind it is set up for, with its
    value present (finite or not: a non-finite value is judged too)."""
    config = config or AlertsConfig()
    out: dict[str, int] = {}
    for run in runs:
        kind = run_kind(run)
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


def earliest(delays: Iterable[int | None]) -> int | None:
    got = [d for d in delays if d is not None]
    return min(got) if got else None


def first_after(starts: Iterable[int], onset: int) -> int | None:
    after = [s - onset for s in starts if s >= onset]
    return min(after) if after else None
