"""Whether an alert stays on while its fault lasts: the faults of the corpus and of the
synthetic streams that last to the run's end (a learning-rate jump, a broken reward, a
reward slide...), and the answering alerts that ended before it did, each with whether its
value was back near its pre-onset level on the record the alert ended (a signal that came
back, as TRL's reward after a one-record dip) or still away (an alert that took the fault
for the run's new level)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from benchmarks.detection.faults import SIGNAL, answering, detector_spans, robust_level
from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig

# the faults that last from their onset to the run's end (not a lone NaN batch or inf loss,
# nor growing spikes, whose alert may end between two spikes)
SUSTAINED = frozenset(
    {
        "lr_jump",
        "zero_reward",
        "length_hack",
        "entropy_collapse",
        "label_corruption",
        "kl_surge",
        "entropy_surge",
        "entropy_drop",
        "reward_slide",
        "loss_step",
        "length_collapse",
    }
)
BACK_Z = 3.0  # robust SDs from the pre-onset median: the value is back


@dataclass(frozen=True)
class Ending:
    """An answering alert that fired at ``fired`` and ended at ``ended``, before its run did."""

    run: str
    detector: str
    fired: int
    ended: int
    back: bool  # its value within BACK_Z robust SDs of the pre-onset median when it ended


def _back(run: CorpusRun, name: str, step: int) -> bool:
    onset = run.onset or 0
    before = [
        v
        for r in run.records
        if (r["step"] or 0) < onset and (v := r.get(name)) is not None and math.isfinite(v)
    ]
    now = next((r.get(name) for r in run.records if (r["step"] or 0) == step), None)
    if len(before) < 5 or now is None or not math.isfinite(now):
        return False
    med, scale = robust_level(before)
    return abs(now - med) / (scale or 1e-12) <= BACK_Z


def endings(run: CorpusRun, config: AlertsConfig | None = None) -> list[Ending]:
    """The alerts answering ``run``'s fault (:data:`EXPECTED`) that fired at or after its
    onset and ended before the run's last record; none for a fault not in :data:`SUSTAINED`.

    >>> import numpy as np
    >>> from benchmarks.detection.synthetic import synthetic_fault
    >>> endings(synthetic_fault("reward_slide", np.random.default_rng(0), 0))  # stays on
    []
    """
    if run.fault not in SUSTAINED or run.onset is None:
        return []
    answers = answering(run)
    ended = [
        (name, fired, end)
        for name, fired, end in detector_spans(run, config)
        if end is not None and name in answers and fired >= run.onset
    ]
    return [
        Ending(run.name, name, fired, end, _back(run, SIGNAL[name][0], end))
        for name, fired, end in sorted(ended, key=lambda span: span[2])
    ]


def endings_line(ends: Iterable[Ending]) -> str:
    """The benchmark's line: alerts that ended while their fault lasted, those whose value was
    back and those still away (by detector)."""
    ends = list(ends)
    away = [e for e in ends if not e.back]
    by_detector: dict[str, int] = {}
    for e in away:
        by_detector[e.detector] = by_detector.get(e.detector, 0) + 1
    still = ", ".join(f"{d} {n}" for d, n in sorted(by_detector.items())) or "none"
    back = ", ".join(f"{e.run} {e.detector} {e.fired}-{e.ended}" for e in ends if e.back)
    return (
        f"alerts that ended while their fault lasted: {len(ends)}; the value back near its "
        f"pre-onset level: {len(ends) - len(away)}{f' ({back})' if back else ''}; still away "
        f"(the fault taken for the run's level): {still}"
    )
