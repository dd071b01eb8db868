"""Prometheus exposition: every collector of the server, over the in-memory snapshot.

Per run (label ``run``: the display name), the values of the latest record of
the run's lowest rank (see :mod:`.series`); a statistic that is missing (or
was non-finite) gives no sample. Runs idle for longer than the retention
window leave /metrics (they stay in the database). ``extended=True`` adds
confidence bounds, entropy percentiles, loss and a ``run_info`` series.

With tens of thousands of runs, formatting samples one by one through
prometheus_client costs seconds, so :class:`Exposition` renders the per-run
families itself: each run's lines are formatted once per change of the run
(cached against its immutable :class:`~.ingest.RunView`) and a scrape joins
them. The other metrics (counters, histogram, process) go through
prometheus_client as usual.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from inversion_monitor.server.names import clean_label_value
from inversion_monitor.server.series import (
    ALL_GAUGES,
    BASE_GAUGES,
    escape_label,
    format_value,
    run_lines,
)
from inversion_monitor.server.state import Counters, RunView

PREFIX = "inversion_monitor_"


class AlertSource(Protocol):
    """What the alert gauge reads (an :class:`~.alerts.AlertEngine`)."""

    def gauge_samples(
        self, include: Callable[[str], bool] = ...
    ) -> list[tuple[str, str, str, float]]: ...


_escape = escape_label


def _header(name: str, doc: str, kind: str) -> str:
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


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
        # run_id -> (the view the lines were made from, one line or "" per per-run family)
        self._lines: dict[str, tuple[RunView, tuple[str, ...]]] = {}
        # the gauges, last_update_timestamp_seconds, run_kind (and run_info)
        self._n_lines = len(self._gauges) + (3 if extended else 2)
        self._lock = threading.Lock()

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
        families.append(
            GaugeMetricFamily(
                PREFIX + "run_kind",
                "The run's kind (value 1): sft, rl, custom or unknown.",
                labels=["run", "kind"],
            )
        )
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
        run_kind = families[n_gauges + 8]
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
            run_kind.add_metric([view.display_name, view.info.kind or "unknown"], 1.0)
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

    # ------------------------------------------------------------ fast text rendering

    def _run_lines(self, view: RunView) -> tuple[str, ...]:
        """The run's lines: made by the writer thread, or here for a view without them."""
        if len(view.lines) == self._n_lines:
            return view.lines
        cached = self._lines.get(view.run_id)
        if cached is None or cached[0] is not view:
            lines = run_lines(
                view.display_name,
                view.run_id,
                view.info,
                view.status,
                view.values,
                view.last_update_time,
                self._extended,
            )
            cached = (view, lines)
            self._lines[view.run_id] = cached
        return cached[1]

    def render(self) -> str:
        """The per-run families and the server totals in the text format (0.0.4)."""
        now = self._clock()
        retention = self._retention_s
        cutoff = now - retention
        shown = [v for v in list(self._views().values()) if v.last_activity >= cutoff]
        n_active = sum(1 for v in shown if v.status == "running")
        with self._lock:
            rows = [self._run_lines(v) for v in shown]
        # one column of lines per family ("" where a run has no sample joins to nothing)
        per_family: list[tuple[str, ...]] = (
            list(zip(*rows, strict=True)) if rows else [() for _ in range(self._n_lines)]
        )
        docs = [(PREFIX + name, doc) for name, doc, _ in self._gauges]
        docs.append(
            (
                PREFIX + "last_update_timestamp_seconds",
                "Unix time the server last stored a record of the run.",
            )
        )
        docs.append((PREFIX + "run_kind", "The run's kind (value 1): sft, rl, custom or unknown."))
        docs.append((PREFIX + "run_info", "Run metadata (value 1)."))
        parts: list[str] = []
        if not self._extended:
            docs.pop()  # no run_info family
        for (name, doc), lines in zip(docs, per_family, strict=True):
            parts.append(_header(name, doc, "gauge"))
            parts.append("".join(lines))
        counters = self._counters()
        parts.append(
            _header(
                PREFIX + "active_runs",
                "Runs not closed and active within the retention window.",
                "gauge",
            )
        )
        parts.append(f"{PREFIX}active_runs {format_value(n_active)}\n")
        for name, doc, value in (
            ("records_ingested", "Records stored since the server started.", counters.ingested),
        ):
            parts.append(_header(PREFIX + name + "_total", doc, "counter"))
            parts.append(f"{PREFIX}{name}_total {format_value(value)}\n")
        parts.append(
            _header(
                PREFIX + "records_rejected_total",
                "Records rejected for good since the server started, by reason.",
                "counter",
            )
        )
        for reason, count in sorted(counters.rejected.items()):
            parts.append(
                f'{PREFIX}records_rejected_total{{reason="{_escape(reason)}"}} '
                f"{format_value(count)}\n"
            )
        for name, doc, value in (
            (
                "records_duplicate",
                "Resent records ignored because they were already stored.",
                counters.duplicates,
            ),
            (
                "nonfinite_values",
                "NaN or infinite statistics stored as missing.",
                counters.nonfinite,
            ),
            ("listener_errors", "Exceptions raised by ingest listeners.", counters.listener_errors),
            (
                "push_commits",
                "Database transactions that stored pushes (one may hold several pushes).",
                counters.commits,
            ),
        ):
            parts.append(_header(PREFIX + name + "_total", doc, "counter"))
            parts.append(f"{PREFIX}{name}_total {format_value(value)}\n")
        return "".join(parts)


class AlertCollector(Collector):
    """``inversion_monitor_alert_active{run, alertname, severity}``.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from inversion_monitor.server.alerts import AlertEngine
    >>> reg = CollectorRegistry()
    >>> reg.register(AlertCollector(AlertEngine()))
    >>> b"inversion_monitor_alert_active" in generate_latest(reg)
    True
    """

    def __init__(
        self,
        engine: AlertSource,
        views: Callable[[], Mapping[str, RunView]] | None = None,
        retention_s: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._views = views
        self._retention_s = retention_s
        self._clock = clock

    def _include(self) -> Callable[[str], bool]:
        if self._views is None:
            return lambda run_id: True
        views = self._views()
        cutoff = self._clock() - self._retention_s

        def include(run_id: str) -> bool:
            view = views.get(run_id)
            return view is not None and view.last_activity >= cutoff

        return include

    def describe(self) -> Iterable[Any]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "inversion_monitor_alert_active",
            "1 while the server's detector alert is active for the run, 0 after it resolved.",
            labels=["run", "alertname", "severity"],
        )

    def collect(self) -> Iterable[Any]:
        family = self._family()
        for run, name, severity, value in self._engine.gauge_samples(self._include()):
            family.add_metric([run, name, severity], value)
        return [family]

    def render(self) -> str:
        """The family in the text format (0.0.4)."""
        parts = [_header(self._family().name, self._family().documentation, "gauge")]
        for run, name, severity, value in self._engine.gauge_samples(self._include()):
            parts.append(
                f'inversion_monitor_alert_active{{alertname="{_escape(name)}",run="{_escape(run)}",'
                f'severity="{_escape(severity)}"}} {format_value(value)}\n'
            )
        return "".join(parts)


class Exposition:
    """The whole /metrics text: the fast per-run families plus a prometheus_client registry.

    >>> from prometheus_client import CollectorRegistry
    >>> text = Exposition(MonitorCollector(lambda: {}, Counters, retention_s=60.0),
    ...                   CollectorRegistry()).render()
    >>> "inversion_monitor_active_runs 0.0" in text.decode()
    True
    """

    def __init__(
        self,
        collector: MonitorCollector,
        registry: CollectorRegistry,
        alerts: AlertCollector | None = None,
    ) -> None:
        self.collector = collector
        self.registry = registry
        self.alerts = alerts

    def render(self) -> bytes:
        text = self.collector.render()
        if self.alerts is not None:
            text += self.alerts.render()
        return text.encode() + generate_latest(self.registry)


def build_registry(*, process_metrics: bool = True) -> tuple[CollectorRegistry, Histogram]:
    """A fresh registry (for what :class:`Exposition` does not render) and the push histogram."""
    registry = CollectorRegistry()
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


def add_queue_depth(registry: CollectorRegistry, depth: Callable[[], int]) -> None:
    """``inversion_monitor_writer_queue_depth``: writes queued for or on the writer thread."""
    Gauge(
        PREFIX + "writer_queue_depth",
        "Writes queued for or running on the writer thread.",
        registry=registry,
    ).set_function(depth)
