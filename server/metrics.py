"""Prometheus exposition: a collector over the in-memory snapshot, never SQLite.

Per run (label ``run``: the display name), the values of the latest record of
the run's lowest rank; a statistic that is missing (or was non-finite) gives
no sample. Runs idle for longer than the retention window leave /metrics
(they stay in the database).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.ingest import Counters, RunView
from inversion_monitor.server.names import clean_label_value

PREFIX = "inversion_monitor_"


def _opt(msg: Any, name: str) -> float | None:
    return float(getattr(msg, name)) if msg.HasField(name) else None


def _spearman(r: monitor_pb2.StepRecord) -> float | None:
    return _opt(r.inversion.spearman, "value")


# name (without prefix), help, extractor: the per-run gauges
RUN_GAUGES: tuple[tuple[str, str, Callable[[monitor_pb2.StepRecord], float | None]], ...] = (
    (
        "spearman",
        "Spearman correlation of per-token entropy and logit-gradient strength "
        "(negative: the entropy-gradient inversion holds).",
        _spearman,
    ),
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
        "logit_grad_norm_mean",
        "Mean per-token logit-gradient strength.",
        lambda r: _opt(r.score, "mean"),
    ),
    ("step", "Trainer global step of the latest record.", lambda r: float(r.step)),
    ("loss", "Training loss reported with the latest record.", lambda r: _opt(r, "loss")),
)


class MonitorCollector(Collector):
    """Builds fresh metric families from the ingestor's snapshot on every scrape.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> reg = CollectorRegistry()
    >>> reg.register(MonitorCollector(lambda: {}, Counters, retention_s=60.0))
    >>> b"inversion_monitor_active_runs 0.0" in generate_latest(reg)
    True
    """

    def __init__(
        self,
        views: Callable[[], Mapping[str, RunView]],
        counters: Callable[[], Counters],
        retention_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._views = views
        self._counters = counters
        self._retention_s = retention_s
        self._clock = clock

    def describe(self) -> Iterable[Any]:
        return self._families()

    def _families(self) -> list[Any]:
        run = ["run"]
        families: list[Any] = [
            GaugeMetricFamily(PREFIX + name, doc, labels=run) for name, doc, _ in RUN_GAUGES
        ]
        families += [
            GaugeMetricFamily(
                PREFIX + "last_update_timestamp_seconds",
                "Unix time the server last stored a record of the run.",
                labels=run,
            ),
            GaugeMetricFamily(
                PREFIX + "run_info",
                "Run metadata (value 1).",
                labels=["run", "run_id", "project", "framework", "model_type", "status"],
            ),
            GaugeMetricFamily(
                PREFIX + "active_runs",
                "Runs not closed and active within the retention window.",
            ),
            CounterMetricFamily(
                PREFIX + "records_ingested", "Records stored since the server started."
            ),
            CounterMetricFamily(
                PREFIX + "records_rejected",
                "Records rejected for good since the server started, by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily(
                PREFIX + "records_duplicate",
                "Resent records ignored because they were already stored.",
            ),
            CounterMetricFamily(
                PREFIX + "nonfinite_values",
                "NaN or infinite statistics stored as missing.",
            ),
            CounterMetricFamily(
                PREFIX + "listener_errors", "Exceptions raised by ingest listeners."
            ),
        ]
        return families

    def collect(self) -> Iterable[Any]:
        families = self._families()
        gauges = families[: len(RUN_GAUGES)]
        last_update, run_info, active, ingested, rejected, dup, nonfinite, lerr = families[
            len(RUN_GAUGES) :
        ]
        extractors = [extract for _, _, extract in RUN_GAUGES]
        now = self._clock()
        retention = self._retention_s
        n_active = 0
        for view in list(self._views().values()):
            if now - view.last_activity > retention:
                continue
            if view.status == "running":
                n_active += 1
            labels = [view.display_name]
            info = view.info
            run_info.add_metric(
                [
                    view.display_name,
                    view.run_id,
                    clean_label_value(info.project),
                    clean_label_value(info.framework),
                    clean_label_value(info.model_type),
                    view.status,
                ],
                1.0,
            )
            if view.last_update_time is not None:
                last_update.add_metric(labels, view.last_update_time)
            record = view.metrics_record
            if record is None:
                continue
            for family, extract in zip(gauges, extractors, strict=True):
                value = extract(record)
                if value is not None:
                    family.add_metric(labels, value)
        counters = self._counters()
        active.add_metric([], n_active)
        ingested.add_metric([], counters.ingested)
        for reason, count in sorted(counters.rejected.items()):
            rejected.add_metric([reason], count)
        dup.add_metric([], counters.duplicates)
        nonfinite.add_metric([], counters.nonfinite)
        lerr.add_metric([], counters.listener_errors)
        return families


def build_registry(
    collector: MonitorCollector, *, process_metrics: bool = True
) -> tuple[CollectorRegistry, Histogram]:
    """A fresh registry with the monitor collector and the push-latency histogram."""
    registry = CollectorRegistry()
    registry.register(collector)
    push_latency = Histogram(
        PREFIX + "push_duration_seconds",
        "Time to handle one Push call, validation and commit included.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        registry=registry,
    )
    if process_metrics:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    return registry, push_latency
