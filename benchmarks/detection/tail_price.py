"""What a one-record path as early as a hand rule would cost: the records where a hand rule
caught a synthetic fault on its onset, scored as the detector scores them, and how many
healthy real records are as far out (counted, and past the sample, a Pareto tail fitted to
the largest)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from benchmarks.detection.faults import SIGNAL, answering, first_after, healthy_part
from benchmarks.detection.hand_rules import HandRules, spike_starts, static_starts
from benchmarks.failure_corpus import CorpusRun
from inversion_monitor.server.detectors import AlertsConfig
from inversion_monitor.server.detectors.robust import DriftConfig, RobustStream, Score, times


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
        if run.onset is None or answering(run) != (det,):
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
