"""The /metrics families in one table: name, help, type, labels and how each is read.

:data:`RUN_FAMILIES` (one sample per run, label ``run``: the display name),
:data:`SERVER_FAMILIES` (server-wide totals) and :data:`ALERT_FAMILY` are the
only place a family's name and help are written: the prometheus_client
collectors and the fast text rendering (:mod:`.metrics`) both read them. A
run's lines (:func:`run_lines`) are made once per change of the run, on the
writer thread, so a scrape only joins them. A reader yields ``(label values,
value)`` pairs; none when the run has no such value (no sample).

A new statistic of the latest record is one row of :data:`BASE_GAUGES` (or
:data:`EXTENDED_GAUGES`, shown with ``--extended-metrics``): name, help and
how to read it from the :class:`~monitor_pb2.StepRecord`.

>>> [f.name for f in SERVER_FAMILIES][:2]
['active_runs', 'records_ingested']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.names import clean_label_value
from inversion_monitor.server.state import Counters, RunView

PREFIX = "inversion_monitor_"

Extractor = Callable[[monitor_pb2.StepRecord], "float | None"]
LabeledValue = tuple[tuple[str, ...], float]
_S = TypeVar("_S")


@dataclass(frozen=True, slots=True)
class Family(Generic[_S]):
    """One family of /metrics: what both the collectors and the fast text write.

    ``name`` is without the ``inversion_monitor_`` prefix (and without
    ``_total`` for a counter); ``read`` gives the samples of one source (a
    :class:`~.state.RunView` for a per-run family, :class:`Totals` for a
    server-wide one) as ``(label values, value)`` in the order of ``labels``.

    >>> f = Family("answers", "Answers given.", lambda n: [((), n)], type="counter")
    >>> f.full_name, list(f.read(3))
    ('inversion_monitor_answers', [((), 3)])
    """

    name: str
    help: str
    read: Callable[[_S], Iterable[LabeledValue]]
    labels: tuple[str, ...] = ()
    type: Literal["gauge", "counter"] = "gauge"
    # only with --extended-metrics (each costs one sample per run per scrape)
    extended: bool = False

    # the sample name (with _total for a counter) and each label's 'name="' (derived)
    sample_name: str = field(init=False, repr=False)
    _keys: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        suffix = "_total" if self.type == "counter" else ""
        object.__setattr__(self, "sample_name", PREFIX + self.name + suffix)
        object.__setattr__(self, "_keys", tuple(f'{k}="' for k in self.labels))

    @property
    def full_name(self) -> str:
        return PREFIX + self.name

    def header(self) -> str:
        """The ``# HELP`` and ``# TYPE`` lines of the text format (0.0.4)."""
        name = self.sample_name
        doc = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {self.type}\n"

    def lines(self, source: _S) -> str:
        """The family's sample lines for ``source`` in the text format."""
        name, keys = self.sample_name, self._keys
        out = []
        for values, value in self.read(source):
            if not keys:
                out.append(f"{name} {format_value(value)}\n")
                continue
            if len(keys) == 1:  # most families: one label, the run
                text = keys[0] + escape_label(values[0])
            else:
                text = '",'.join([k + escape_label(v) for k, v in zip(keys, values, strict=True)])
            out.append(f'{name}{{{text}"}} {format_value(value)}\n')
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Totals:
    """What the server-wide families read: the counters and the active runs."""

    counters: Counters
    active_runs: int


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


def _gauge_reader(index: int) -> Callable[[RunView], Iterable[LabeledValue]]:
    def read(view: RunView) -> Iterable[LabeledValue]:
        value = view.values[index]
        return () if value is None else (((view.display_name,), value),)

    return read


def _last_update(view: RunView) -> Iterable[LabeledValue]:
    t = view.last_update_time
    return () if t is None else (((view.display_name,), t),)


def _run_kind(view: RunView) -> Iterable[LabeledValue]:
    return (((view.display_name, view.info.kind or "unknown"), 1.0),)


def _probe_precision(view: RunView) -> Iterable[LabeledValue]:
    record = view.metrics_record
    if record is None or not record.HasField("probe_precision"):
        return ()
    return (((view.display_name, record.probe_precision), 1.0),)


def _run_info(view: RunView) -> Iterable[LabeledValue]:
    info = view.info
    labels = (
        view.display_name,
        view.run_id,
        clean_label_value(info.project),
        clean_label_value(info.framework),
        clean_label_value(info.model_type),
        view.status,
    )
    return ((labels, 1.0),)


# one family per gauge, in the order of RunView.values, then the run's other families
RUN_FAMILIES: tuple[Family[RunView], ...] = (
    *(
        Family(name, doc, _gauge_reader(i), ("run",), extended=i >= len(BASE_GAUGES))
        for i, (name, doc, _) in enumerate(ALL_GAUGES)
    ),
    Family(
        "last_update_timestamp_seconds",
        "Unix time the server last stored a record of the run.",
        _last_update,
        ("run",),
    ),
    Family(
        "run_kind",
        "The run's kind (value 1): sft, rl, custom or unknown.",
        _run_kind,
        ("run", "kind"),
    ),
    Family(
        "probe_precision",
        "What the latest probe's forward computed in (value 1): fp32, bf16-autocast, ...",
        _probe_precision,
        ("run", "precision"),
        extended=True,
    ),
    Family(
        "run_info",
        "Run metadata (value 1).",
        _run_info,
        ("run", "run_id", "project", "framework", "model_type", "status"),
        extended=True,
    ),
)


def _total(read: Callable[[Counters], float]) -> Callable[[Totals], Iterable[LabeledValue]]:
    return lambda totals: (((), read(totals.counters)),)


SERVER_FAMILIES: tuple[Family[Totals], ...] = (
    Family(
        "active_runs",
        "Runs not closed and active within the retention window.",
        lambda totals: (((), totals.active_runs),),
    ),
    Family(
        "records_ingested",
        "Records stored since the server started.",
        _total(lambda c: c.ingested),
        type="counter",
    ),
    Family(
        "records_rejected",
        "Records rejected for good since the server started, by reason.",
        lambda totals: (((r,), n) for r, n in sorted(totals.counters.rejected.items())),
        ("reason",),
        type="counter",
    ),
    Family(
        "records_duplicate",
        "Resent records ignored because they were already stored.",
        _total(lambda c: c.duplicates),
        type="counter",
    ),
    Family(
        "nonfinite_values",
        "NaN or infinite statistics stored as missing.",
        _total(lambda c: c.nonfinite),
        type="counter",
    ),
    Family(
        "listener_errors",
        "Exceptions raised by ingest listeners.",
        _total(lambda c: c.listener_errors),
        type="counter",
    ),
    Family(
        "push_commits",
        "Database transactions that stored pushes (one may hold several pushes).",
        _total(lambda c: c.commits),
        type="counter",
    ),
)

# (run, alertname, severity, value) as AlertEngine.gauge_samples gives them
AlertSample = tuple[str, str, str, float]
ALERT_FAMILY: Family[Sequence[AlertSample]] = Family(
    "alert_active",
    "1 while the server's detector alert is active for the run, 0 after it resolved.",
    lambda rows: (((run, name, severity), value) for run, name, severity, value in rows),
    ("run", "alertname", "severity"),
)


def run_families(extended: bool) -> tuple[Family[RunView], ...]:
    """The per-run families /metrics shows (with ``extended``: all of them)."""
    return RUN_FAMILIES if extended else tuple(f for f in RUN_FAMILIES if not f.extended)


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


def run_lines(view: RunView, extended: bool) -> tuple[str, ...]:
    """A run's lines in each family of :func:`run_families`, ``""`` where it has no sample.

    >>> view = RunView("r1", 1, "demo", monitor_pb2.RunInfo(), 0.0, 9.0, 9.0, "running", 1,
    ...                None, None, (0.5,) + (None,) * (len(ALL_GAUGES) - 1))
    >>> run_lines(view, False)[:2]
    ('inversion_monitor_spearman{run="demo"} 0.5\\n', '')
    """
    return tuple(family.lines(view) for family in run_families(extended))
