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
them. Every family's name, help, type and labels, and how its samples are
read, come from the one table in :mod:`.series`. The histogram and process
metrics go through prometheus_client as usual.
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

from inversion_monitor.server.series import (
    ALERT_FAMILY,
    PREFIX,
    SERVER_FAMILIES,
    Family,
    Totals,
    run_families,
    run_lines,
)
from inversion_monitor.server.state import Counters, RunView


class AlertSource(Protocol):
    """What the alert gauge reads (an :class:`~.alerts.AlertEngine`)."""

    def gauge_samples(
        self, include: Callable[[str], bool] = ...
    ) -> list[tuple[str, str, str, float]]: ...


def _family(spec: Family[Any]) -> GaugeMetricFamily | CounterMetricFamily:
    """An empty prometheus_client family for a row of the table."""
    kind = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
    return kind(spec.full_name, spec.help, labels=list(spec.labels))


class MonitorCollector(Collector):
    """Builds fresh metric families from the ingestor's snapshot on every scrape.

    Both :meth:`collect` (prometheus_client) and :meth:`render` (the fast text)
    write the families of :data:`~.series.RUN_FAMILIES` and
    :data:`~.series.SERVER_FAMILIES`.

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
        self._run_families = run_families(extended)
        # run_id -> (the view the lines were made from, one line or "" per per-run family)
        self._lines: dict[str, tuple[RunView, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Any]:
        specs: list[Family[Any]] = [*self._run_families, *SERVER_FAMILIES]
        return [_family(spec) for spec in specs]

    def _shown(self) -> tuple[list[RunView], Totals]:
        """The runs active within the retention window, and the server totals."""
        cutoff = self._clock() - self._retention_s
        shown = [v for v in list(self._views().values()) if v.last_activity >= cutoff]
        n_active = sum(1 for v in shown if v.status == "running")
        return shown, Totals(self._counters(), n_active)

    def collect(self) -> Iterable[Any]:
        shown, totals = self._shown()
        families = []
        for spec in self._run_families:
            family = _family(spec)
            for view in shown:
                for labels, value in spec.read(view):
                    family.add_metric(list(labels), value)
            families.append(family)
        for server_spec in SERVER_FAMILIES:
            family = _family(server_spec)
            for labels, value in server_spec.read(totals):
                family.add_metric(list(labels), value)
            families.append(family)
        return families

    # ------------------------------------------------------------ fast text rendering

    def _run_lines(self, view: RunView) -> tuple[str, ...]:
        """The run's lines: made by the writer thread, or here for a view without them."""
        if len(view.lines) == len(self._run_families):
            return view.lines
        cached = self._lines.get(view.run_id)
        if cached is None or cached[0] is not view:
            cached = (view, run_lines(view, self._extended))
            self._lines[view.run_id] = cached
        return cached[1]

    def render(self) -> str:
        """The per-run families and the server totals in the text format (0.0.4)."""
        shown, totals = self._shown()
        with self._lock:
            rows = [self._run_lines(v) for v in shown]
        # one column of lines per family ("" where a run has no sample joins to nothing)
        per_family: list[tuple[str, ...]] = (
            list(zip(*rows, strict=True)) if rows else [() for _ in self._run_families]
        )
        parts: list[str] = []
        for spec, lines in zip(self._run_families, per_family, strict=True):
            parts.append(spec.header())
            parts.append("".join(lines))
        for server_spec in SERVER_FAMILIES:
            parts.append(server_spec.header())
            parts.append(server_spec.lines(totals))
        return "".join(parts)


class AlertCollector(Collector):
    """``inversion_monitor_alert_active{run, alertname, severity}`` (:data:`~.series.ALERT_FAMILY`).

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
        return [_family(ALERT_FAMILY)]

    def collect(self) -> Iterable[Any]:
        family = _family(ALERT_FAMILY)
        for labels, value in ALERT_FAMILY.read(self._engine.gauge_samples(self._include())):
            family.add_metric(list(labels), value)
        return [family]

    def render(self) -> str:
        """The family in the text format (0.0.4)."""
        rows = self._engine.gauge_samples(self._include())
        return ALERT_FAMILY.header() + ALERT_FAMILY.lines(rows)


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
