"""Prometheus exposition: a collector over the in-memory snapshot, never SQLite.

Per run (label ``run``: the display name), the values of the latest record of
the run's lowest rank (see :mod:`.series`); a statistic that is missing (or
was non-finite) gives no sample. Runs idle for longer than the retention
window leave /metrics (they stay in the database). ``extended=True`` adds
confidence bounds, entropy percentiles, loss and a ``run_info`` series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from inversion_monitor.server.ingest import Counters, RunView
from inversion_monitor.server.names import clean_label_value
from inversion_monitor.server.series import ALL_GAUGES, BASE_GAUGES

PREFIX = "inversion_monitor_"


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
        *,
        extended: bool = False,
    ) -> None:
        self._views = views
        self._counters = counters
        self._retention_s = retention_s
        self._clock = clock
        self._extended = extended
        self._gauges = ALL_GAUGES if extended else BASE_GAUGES

    def describe(self) -> Iterable[Any]:
        return self._families()

    def _families(self) -> list[Any]:
        run = ["run"]
        families: list[Any] = [
            GaugeMetricFamily(PREFIX + name, doc, labels=run) for name, doc, _ in self._gauges
        ]
        families += [
            GaugeMetricFamily(
                PREFIX + "last_update_timestamp_seconds",
                "Unix time the server last stored a record of the run.",
                labels=run,
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
            CounterMetricFamily(
                PREFIX + "push_commits",
                "Database transactions that stored pushes (one may hold several pushes).",
            ),
        ]
        if self._extended:
            families.append(
                GaugeMetricFamily(
                    PREFIX + "run_info",
                    "Run metadata (value 1).",
                    labels=["run", "run_id", "project", "framework", "model_type", "status"],
                )
            )
        return families

    def collect(self) -> Iterable[Any]:
        families = self._families()
        n_gauges = len(self._gauges)
        gauges = families[:n_gauges]
        last_update, active, ingested, rejected, dup, nonfinite, lerr, commits = families[
            n_gauges : n_gauges + 8
        ]
        run_info = families[-1]
        # (samples list, sample name) per gauge, in the order of view.values
        targets = [(family.samples, family.name) for family in gauges]
        last_samples, last_name = last_update.samples, last_update.name
        extended = self._extended
        now = self._clock()
        retention = self._retention_s
        n_active = 0
        for view in list(self._views().values()):
            if now - view.last_activity > retention:
                continue
            if view.status == "running":
                n_active += 1
            labels = {"run": view.display_name}  # shared by the run's samples (read-only)
            if view.last_update_time is not None:
                last_samples.append(Sample(last_name, labels, view.last_update_time))
            for (samples, name), value in zip(targets, view.values, strict=False):
                if value is not None:
                    samples.append(Sample(name, labels, value))
            if extended:
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
        counters = self._counters()
        active.add_metric([], n_active)
        ingested.add_metric([], counters.ingested)
        for reason, count in sorted(counters.rejected.items()):
            rejected.add_metric([reason], count)
        dup.add_metric([], counters.duplicates)
        nonfinite.add_metric([], counters.nonfinite)
        lerr.add_metric([], counters.listener_errors)
        commits.add_metric([], counters.commits)
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
