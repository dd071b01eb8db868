"""Per-layer, per-projection series (opt-in, bounded cardinality).

With ``--component-metrics`` the server exports, per run, the components of
its latest record (:mod:`.series` picks the record): Spearman rho and mean
score of each probed (layer, projection) as
``inversion_monitor_component_spearman{run, layer, projection}`` and
``inversion_monitor_component_logit_grad_norm_mean{run, layer, projection}``.
At most ``max_per_run`` components per run are exported (lowest layers first,
then q, k, v, o), so the series count is bounded by active runs x
``max_per_run`` whatever the clients send.

(``inversion_monitor_run_kind{run, kind}``, one series per run so that rules
can treat SFT and RL runs differently, is in the fast per-run lines of
:mod:`.series`.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inversion_monitor.proto.v1 import monitor_pb2

_PROJECTION_ORDER = {"q": 0, "k": 1, "v": 2, "o": 3}


class _View(Protocol):
    @property
    def display_name(self) -> str: ...
    @property
    def last_activity(self) -> float: ...
    @property
    def info(self) -> monitor_pb2.RunInfo: ...
    @property
    def metrics_record(self) -> monitor_pb2.StepRecord | None: ...


def _live(
    views: Callable[[], Mapping[str, _View]], retention_s: float, clock: Callable[[], float]
) -> list[_View]:
    cutoff = clock() - retention_s
    return [v for v in list(views().values()) if v.last_activity >= cutoff]


class ComponentCollector(Collector):
    """Component series of every live run, at most ``max_per_run`` per run.

    >>> from types import SimpleNamespace
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> rec = monitor_pb2.StepRecord()
    >>> _ = rec.components.add(layer=3, projection="o", spearman=-0.4, score_mean=2.0)
    >>> view = SimpleNamespace(display_name="r", last_activity=1e18, metrics_record=rec,
    ...                        info=monitor_pb2.RunInfo())
    >>> reg = CollectorRegistry()
    >>> reg.register(ComponentCollector(lambda: {"id": view}, retention_s=60.0))
    >>> reg.get_sample_value("inversion_monitor_component_spearman",
    ...                      {"run": "r", "layer": "3", "projection": "o"})
    -0.4
    """

    def __init__(
        self,
        views: Callable[[], Mapping[str, _View]],
        retention_s: float = math.inf,
        max_per_run: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_per_run < 1:
            raise ValueError(f"max_per_run={max_per_run} must be >= 1")
        self._views = views
        self._retention_s = retention_s
        self._max_per_run = max_per_run
        self._clock = clock

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        labels = ["run", "layer", "projection"]
        return [
            GaugeMetricFamily(
                "inversion_monitor_component_spearman",
                "Spearman rho of token entropy and the logit-gradient strength of one "
                "(layer, projection).",
                labels=labels,
            ),
            GaugeMetricFamily(
                "inversion_monitor_component_logit_grad_norm_mean",
                "Mean logit-gradient strength of one (layer, projection).",
                labels=labels,
            ),
        ]

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterable[Any]:
        spearman, score = families = self._families()
        for view in _live(self._views, self._retention_s, self._clock):
            record = view.metrics_record
            if record is None or not record.components:
                continue
            ordered = sorted(
                record.components,
                key=lambda c: (c.layer, _PROJECTION_ORDER.get(c.projection, 9), c.projection),
            )
            for comp in ordered[: self._max_per_run]:
                labels = [view.display_name, str(comp.layer), comp.projection]
                if comp.HasField("spearman"):
                    spearman.add_metric(labels, comp.spearman)
                if comp.HasField("score_mean"):
                    score.add_metric(labels, comp.score_mean)
        return families
