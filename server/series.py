"""The per-run gauges: name, help, how each is read from a run's latest record, and its text.

Computed once per change of a run (on the writer thread), so a scrape only
joins lines. ``None`` means the record has no such value: no sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.names import clean_label_value

PREFIX = "inversion_monitor_"

Extractor = Callable[[monitor_pb2.StepRecord], "float | None"]


def _opt(msg: Any, name: str) -> float | None:
    return float(getattr(msg, name)) if msg.HasField(name) else None


# the training health of the latest optimizer step (one record per step, probe or not);
# a NaN or infinite value is exported as NaN/+Inf/-Inf
HEALTH_GAUGES: tuple[tuple[str, str, Extractor], ...] = (
    ("loss", "Training loss of the latest optimizer step.", lambda r: _opt(r, "loss")),
    (
        "grad_norm",
        "Gradient norm of the latest optimizer step, before clipping (as the trainer computed it).",
        lambda r: _opt(r, "grad_norm"),
    ),
    (
        "learning_rate",
        "Learning rate the latest optimizer step used.",
        lambda r: _opt(r, "learning_rate"),
    ),
    (
        "kl",
        "KL divergence of the policy from the reference model (RL runs; TRL's 'kl').",
        lambda r: _opt(r, "kl"),
    ),
    (
        "clip_ratio",
        "Fraction of completion tokens whose probability ratio was clipped (RL runs).",
        lambda r: _opt(r, "clip_ratio"),
    ),
    (
        "completion_length_mean_tokens",
        "Mean length of the policy's completions, tokens (RL runs).",
        lambda r: _opt(r, "completion_length_mean"),
    ),
    (
        "nonfinite_health_values",
        "Health values of the latest record that are NaN or infinite (nonfinite_fields).",
        lambda r: float(len(r.nonfinite_fields)),
    ),
)

# (name without the inversion_monitor_ prefix, help, extractor)
BASE_GAUGES: tuple[tuple[str, str, Extractor], ...] = (
    (
        "spearman",
        "Spearman correlation of per-token entropy and logit-gradient strength "
        "(negative: the entropy-gradient inversion holds).",
        lambda r: _opt(r.inversion.spearman, "value"),
    ),
    (
        "pearson",
        "Pearson correlation of per-token entropy and logit-gradient strength.",
        lambda r: _opt(r.inversion.pearson, "value"),
    ),
    (
        "tokens_sampled",
        "Tokens the latest statistics were computed over.",
        lambda r: float(r.inversion.n) if r.HasField("inversion") else None,
    ),
    (
        "entropy_mean_nats",
        "Mean per-token predictive entropy, nats.",
        lambda r: _opt(r.entropy, "mean"),
    ),
    (
        "logit_grad_norm_mean",
        "Mean per-token logit-gradient strength.",
        lambda r: _opt(r.score, "mean"),
    ),
    ("step", "Trainer global step of the latest record.", lambda r: float(r.step)),
    (
        "reward_mean",
        "Mean reward of the policy's completions (RL runs; the generation batch the latest "
        "optimizer step trained on).",
        lambda r: _opt(r, "reward_mean"),
    ),
    (
        "policy_entropy_mean_nats",
        "Mean per-token entropy of the policy over completion tokens (RL runs), nats.",
        lambda r: _opt(r, "policy_entropy_mean"),
    ),
    (
        "entropy_covariance",
        "Cui et al. covariance of token log-probability and advantage over completion tokens "
        "(positive and large: entropy falling).",
        lambda r: _opt(r, "entropy_covariance"),
    ),
    *HEALTH_GAUGES,
)

# with --extended-metrics (each costs one sample per run per scrape)
EXTENDED_GAUGES: tuple[tuple[str, str, Extractor], ...] = (
    (
        "spearman_ci_lower",
        "Lower bound of the Spearman confidence interval.",
        lambda r: _opt(r.inversion.spearman, "ci_low"),
    ),
    (
        "spearman_ci_upper",
        "Upper bound of the Spearman confidence interval.",
        lambda r: _opt(r.inversion.spearman, "ci_high"),
    ),
    (
        "entropy_p10_nats",
        "10th percentile of per-token predictive entropy, nats.",
        lambda r: _opt(r.entropy, "p10"),
    ),
    (
        "entropy_p50_nats",
        "Median per-token predictive entropy, nats.",
        lambda r: _opt(r.entropy, "p50"),
    ),
    (
        "entropy_p90_nats",
        "90th percentile of per-token predictive entropy, nats.",
        lambda r: _opt(r.entropy, "p90"),
    ),
    (
        "reward_std",
        "Standard deviation of the completions' rewards (RL runs).",
        lambda r: _opt(r, "reward_std"),
    ),
    (
        "policy_entropy_p10_nats",
        "10th percentile of the policy's per-token entropy over completion tokens, nats.",
        lambda r: _opt(r.policy_entropy, "p10"),
    ),
    (
        "policy_entropy_p90_nats",
        "90th percentile of the policy's per-token entropy over completion tokens, nats.",
        lambda r: _opt(r.policy_entropy, "p90"),
    ),
    (
        "advantage_mean",
        "Mean advantage of the completions (RL runs).",
        lambda r: _opt(r.advantage, "mean"),
    ),
)

ALL_GAUGES = BASE_GAUGES + EXTENDED_GAUGES


def gauge_values(record: monitor_pb2.StepRecord | None) -> tuple[float | None, ...]:
    """Values of :data:`ALL_GAUGES` for ``record`` (all None without a record).

    >>> rec = monitor_pb2.StepRecord(step=7)
    >>> rec.entropy.mean = 2.5
    >>> dict(zip([g[0] for g in ALL_GAUGES], gauge_values(rec)))["entropy_mean_nats"]
    2.5
    """
    if record is None:
        return (None,) * len(ALL_GAUGES)
    return tuple(extract(record) for _, _, extract in ALL_GAUGES)


def escape_label(value: str) -> str:
    """A label value for the text exposition format (backslash, newline, quote escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    """A sample value as the text format writes it (``+Inf``, ``-Inf``, ``NaN``, else repr).

    >>> format_value(0.25), format_value(float("inf")), format_value(3)
    ('0.25', '+Inf', '3.0')
    """
    value = float(value)
    if math.isfinite(value):
        return repr(value)
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def run_lines(  # noqa: PLR0917
    display_name: str,
    run_id: str,
    info: monitor_pb2.RunInfo,
    status: str,
    values: tuple[float | None, ...],
    last_update_time: float | None,
    extended: bool,
) -> tuple[str, ...]:
    """A run's line in each per-run family of /metrics, ``""`` where it has no sample.

    The families: the gauges (:data:`BASE_GAUGES`, or :data:`ALL_GAUGES` when
    ``extended``), ``last_update_timestamp_seconds``, ``run_kind`` (sft, rl,
    custom or unknown), and ``run_info`` when ``extended``.

    >>> run_lines("demo", "r1", monitor_pb2.RunInfo(), "running", (0.5,) + (None,) * 11, 9.0,
    ...           False)[:2]
    ('inversion_monitor_spearman{run="demo"} 0.5\\n', '')
    """
    gauges = ALL_GAUGES if extended else BASE_GAUGES
    label = '{run="' + escape_label(display_name) + '"} '
    lines = [
        "" if value is None else f"{PREFIX}{name}{label}{format_value(value)}\n"
        for (name, _, _), value in zip(gauges, values, strict=False)
    ]
    lines.append(
        ""
        if last_update_time is None
        else f"{PREFIX}last_update_timestamp_seconds{label}{format_value(last_update_time)}\n"
    )
    kind = escape_label(info.kind or "unknown")
    lines.append(f'{PREFIX}run_kind{{run="{escape_label(display_name)}",kind="{kind}"}} 1.0\n')
    if extended:
        pairs = (
            ("run", display_name),
            ("run_id", run_id),
            ("project", clean_label_value(info.project)),
            ("framework", clean_label_value(info.framework)),
            ("model_type", clean_label_value(info.model_type)),
            ("status", status),
        )
        text = ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs)
        lines.append(f"{PREFIX}run_info{{{text}}} 1.0\n")
    return tuple(lines)
