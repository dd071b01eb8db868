"""Whether rho moves before the reward and the policy entropy in the corpus' RL faults (the
inversion's lead or lag)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from benchmarks.detection.faults import robust_level
from benchmarks.failure_corpus import CorpusRun


def first_move(values: Sequence[float | None], onset_index: int, z: float = 3.0) -> int | None:
    """Records after the onset until a value is ``z`` robust SDs from its pre-onset level."""
    before = [v for v in values[5:onset_index] if v is not None and math.isfinite(v)]
    if len(before) < 5:
        return None
    med, scale = robust_level(before)
    scale = scale or 1e-9
    for i, v in enumerate(values[onset_index:]):
        if v is not None and (not math.isfinite(v) or abs(v - med) / scale > z):
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
