"""One probe of the engine: its plan (batch, sample, prefix) and its measurement.

:class:`ProbePlan` is what a rank checked before the ranks agree to probe;
:func:`measure` runs the probe on it (a collective when the weights are
sharded) and computes the statistics; :class:`Measured` is the outcome the
engine sends with the step's health. The schedule, the ranks' agreement and
the sinks stay in :mod:`inversion_monitor.engine.training_monitor`.

Used by the engine as::

    plan = ProbePlan(model, batch, sampler.sample(batch.target_mask()), prepare_s=0.0)
    measured = measure(step, plan, config)   # measured.stats, measured.result
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from inversion_monitor.config import MonitorConfig
from inversion_monitor.engine.divergence import explain_probe_failure
from inversion_monitor.metrics.correlation import spearman
from inversion_monitor.metrics.stats import InversionStats, inversion_stats
from inversion_monitor.probe.capture import CapturedBatch
from inversion_monitor.probe.gradients import ProbeResult, logit_gradient_norms
from inversion_monitor.probe.precision import ProbePrecision
from inversion_monitor.probe.prefix_capture import CapturedPrefix

__all__ = ["Measured", "ProbePlan", "measure", "token_samples"]


@dataclass(frozen=True)
class ProbePlan:
    """What one probe will measure, checked on this rank before the ranks agree to probe."""

    model: nn.Module
    batch: CapturedBatch
    positions: torch.Tensor
    prepare_s: float
    prefix: CapturedPrefix | None = None  # the training forward's hidden states, if kept
    prefix_note: str | None = None  # why none was kept
    precision: ProbePrecision | None = None  # the training forward's autocast, if seen


@dataclass(frozen=True)
class Measured:
    """A probe's outcome, sent with its step's health (before the optimizer step: by step_end)."""

    step: int
    stats: InversionStats
    result: ProbeResult
    batch: CapturedBatch
    seconds: float
    components: list[dict[str, Any]] | None

    @property
    def prefix(self) -> str:
        """``"captured"``, or ``"recomputed"`` with the reason when one is known."""
        result = self.result
        if result.prefix_reason is None:
            return result.prefix
        return f"{result.prefix}: {result.prefix_reason}"


def measure(step: int, plan: ProbePlan, config: MonitorConfig) -> Measured:
    """Run the probe on ``plan`` (a collective when weights are sharded) and its statistics."""
    start = time.perf_counter() - plan.prepare_s
    batch = plan.batch
    try:
        result = logit_gradient_norms(
            plan.model,
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            positions=plan.positions,
            layers=config.layers,
            projections=config.projections,
            norm=config.norm,
            chunk_tokens=config.chunk_tokens,
            prefix=plan.prefix,
            precision=plan.precision,
        )
    except Exception as exc:  # a diverged model's failure names its NaN weights
        explained = explain_probe_failure(plan.model, step, exc)
        if explained is exc:
            raise
        raise explained from exc
    if result.prefix == "recomputed" and result.prefix_reason is None:
        result = replace(result, prefix_reason=plan.prefix_note)
    stats = inversion_stats(
        result.entropy,
        result.score,
        method=config.method,
        per_token_type=config.per_token_type,
        tokens=result.tokens if config.per_token_type else None,
    )
    components = component_stats(result) if config.per_component_stats else None
    return Measured(
        step=step,
        stats=stats,
        result=result,
        batch=batch,
        seconds=time.perf_counter() - start,
        components=components,
    )


def component_stats(result: ProbeResult) -> list[dict[str, Any]]:
    """Per (layer, projection): the mean score and, with enough tokens, Spearman's rho."""
    out = []
    enough = len(result) >= 4 and len(result.norms) > 1
    for (layer, projection), values in result.norms.items():
        item: dict[str, Any] = {
            "layer": layer,
            "projection": projection,
            "score_mean": float(values.mean()) if len(result) else math.nan,
        }
        if enough:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                item["spearman"] = float(spearman(result.entropy, values))
        out.append(item)
    return out


def token_samples(result: ProbeResult, count: int) -> list[tuple[float, float, int]] | None:
    """The first ``count`` (entropy, score, token id) triples; None when there are none."""
    count = min(count, len(result))
    if count == 0:
        return None
    return [
        (float(result.entropy[i]), float(result.score[i]), int(result.tokens[i]))
        for i in range(count)
    ]
