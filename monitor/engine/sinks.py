"""Where the monitor's measurements go: the ``Sink`` protocol and its three sinks.

The engine (:class:`~inversion_monitor.engine.training_monitor.InversionMonitor`) builds one
:class:`TrainingRecord` per optimizer step (the step's training health, plus the
probe's statistics on steps the probe ran) and hands it to each sink: the
trainer's logs (:class:`TrainerLogSink`, always; probe records only, the
trainer logs its own health values), a JSONL file (:class:`JsonlSink`, with
``jsonl_path``) and the monitor server (:class:`GrpcSink`, with ``endpoint``).
A new destination is one class with ``emit``, ``flush`` and ``close``.

>>> stats = InversionStats.insufficient_sample(n=3, reason="n < 4")
>>> record = TrainingRecord(run_id="r", run_name="demo", rank=0, step=3, stats=stats,
...                         probe_seconds=0.1, health={"loss": 2.0})
>>> logs = TrainerLogSink()
>>> logs.emit(record)
>>> metrics = logs.take()
>>> metrics is not None and metrics["inversion/insufficient"], logs.take()
(1.0, None)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from inversion_monitor.config import MonitorConfig
from inversion_monitor.metrics.stats import InversionStats
from inversion_monitor.rl.signals import RLStats

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.telemetry.client import MonitorClient
    from inversion_monitor.telemetry.window import DeliveryReport


@dataclass(frozen=True)
class TrainingRecord:
    """One optimizer step's training health and, when the probe ran, its measurement."""

    run_id: str
    run_name: str
    rank: int
    step: int
    stats: InversionStats | None = None  # None: the probe did not run at this step
    probe_seconds: float | None = None
    # HEALTH_FIELDS names -> values (NaN and inf kept: a diverged step)
    health: Mapping[str, float] = field(default_factory=dict)
    components: list[dict[str, Any]] | None = None
    samples: list[tuple[float, float, int]] | None = None
    kind: str | None = None
    rl: RLStats | None = None  # the step's RL signals (quantiles, advantages)
    prefix: str | None = None  # "captured", or "recomputed" with the reason
    precision: str | None = None  # what the probe's forward computed in (ProbeResult.precision)
    wall_time: float = field(default_factory=time.time)


class Sink(Protocol):
    """A destination of training records. ``emit`` must be cheap and never block on I/O
    that can hang (the gRPC client queues; files are local)."""

    def emit(self, record: TrainingRecord) -> None:
        """Take one record."""

    def flush(self, timeout_s: float) -> bool:
        """Push out what is buffered; True when everything arrived."""

    def close(self, timeout_s: float) -> DeliveryReport | None:
        """Flush and release resources; the gRPC sink returns its delivery report."""


def trainer_metrics(stats: InversionStats, *, probe_seconds: float) -> dict[str, float]:
    """The flat ``inversion/...`` values added to a trainer's logs.

    >>> s = InversionStats.insufficient_sample(n=3, reason="n < 4")
    >>> trainer_metrics(s, probe_seconds=0.5)["inversion/insufficient"]
    1.0
    """
    low, high = stats.ci
    metrics = {
        "inversion/rho": stats.rho,
        "inversion/spearman": stats.spearman,
        "inversion/pearson": stats.pearson,
        "inversion/ci_low": low,
        "inversion/ci_high": high,
        "inversion/n": float(stats.n),
        "inversion/insufficient": float(stats.insufficient),
        "inversion/entropy_mean": stats.entropy_mean,
        "inversion/entropy_p10": stats.entropy_p10,
        "inversion/entropy_p50": stats.entropy_p50,
        "inversion/entropy_p90": stats.entropy_p90,
        "inversion/score_mean": stats.score_mean,
        "inversion/score_p50": stats.score_p50,
        "inversion/probe_seconds": probe_seconds,
    }
    if stats.spearman_per_token_type is not None:
        metrics["inversion/spearman_per_token_type"] = stats.spearman_per_token_type
    return {key: float(value) for key, value in metrics.items()}


class TrainerLogSink:
    """Holds the ``inversion/...`` metrics of the last record for the trainer's logs.

    The framework adapter takes them (:meth:`take`) and adds them to the
    trainer's log when ``log_to_trainer`` is set.
    """

    def __init__(self) -> None:
        self._latest: dict[str, float] | None = None

    def emit(self, record: TrainingRecord) -> None:
        if record.stats is None:  # the trainer logs its own health values
            return
        self._latest = trainer_metrics(record.stats, probe_seconds=record.probe_seconds or 0.0)
        if record.rl is not None:
            self._latest.update(record.rl.trainer_metrics())

    def take(self) -> dict[str, float] | None:
        """The metrics of the last record, once."""
        latest, self._latest = self._latest, None
        return latest

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s: float) -> DeliveryReport | None:
        self._latest = None
        return None


class JsonlSink:
    """Appends one JSON object per record to a file (``<stem>.rank<r><suffix>`` when
    ``world_size > 1``).

    Every row has ``step``, ``probed`` and the health values it knows
    (:data:`~inversion_monitor.proto.vocabulary.HEALTH_FIELDS`); a probed row
    also has the inversion statistics. A non-finite health value is written
    as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads it back)
    and named in ``nonfinite_fields``; other NaN and infinities become null.
    """

    def __init__(self, path: str | os.PathLike[str], *, rank: int, world_size: int) -> None:
        target = Path(path)
        if world_size > 1:
            target = target.with_name(f"{target.stem}.rank{rank}{target.suffix}")
        self.path = target
        self._file: TextIO | None = None

    def emit(self, record: TrainingRecord) -> None:
        row: dict[str, Any] = {
            "run_id": record.run_id,
            "run_name": record.run_name,
            "rank": record.rank,
            "step": record.step,
            "wall_time": record.wall_time,
            "probed": record.stats is not None,
            "kind": record.kind,
        }
        nonfinite = []
        for name, value in record.health.items():
            if math.isfinite(value):
                row[name] = value
            else:
                row[name] = repr(float(value))  # 'nan', 'inf', '-inf'
                nonfinite.append(name)
        row["nonfinite_fields"] = nonfinite
        if record.stats is not None:
            row["probe_seconds"] = record.probe_seconds
            row.update((k, v) for k, v in record.stats.to_dict().items() if k != "extra")
            row["components"] = record.components
            row["samples"] = record.samples
            row["prefix"] = record.prefix
            row["probe_precision"] = record.precision
        if record.rl is not None:
            row["rl"] = record.rl.to_dict()
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        self._file.flush()

    def flush(self, timeout_s: float) -> bool:
        if self._file is not None:
            self._file.flush()
        return True

    def close(self, timeout_s: float) -> DeliveryReport | None:
        if self._file is not None:
            self._file.close()
            self._file = None
        return None


class GrpcSink:
    """Sends records to the monitor server through a :class:`MonitorClient`.

    The client is created at the first record (so the run id agreed across
    ranks and the model type are known), with every setting from ``config``.
    """

    def __init__(
        self,
        config: MonitorConfig,
        *,
        rank: int,
        world_size: int,
        framework: str,
        model_type: Callable[[], str],
    ) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.framework = framework
        self._model_type = model_type
        self.client: MonitorClient | None = None

    def emit(self, record: TrainingRecord) -> None:
        if self.client is None:
            self.client = self._connect(record)
        self.client.log(
            record.step,
            record.stats,
            components=record.components,
            samples=record.samples,
            probe_seconds=record.probe_seconds,
            wall_time=record.wall_time,
            rl=record.rl,
            health=record.health,
            probe_precision=record.precision,
        )

    def _connect(self, record: TrainingRecord) -> MonitorClient:
        from inversion_monitor.telemetry.client import MonitorClient

        config = self.config
        return MonitorClient(
            str(config.endpoint),
            record.run_name,
            project=config.project,
            labels=config.labels,
            run_id=record.run_id,
            rank=self.rank,
            world_size=self.world_size,
            framework=self.framework,
            model_type=self._model_type(),
            kind=record.kind,
            config=config.public_dict(),
            token=config.token,
            tls=config.tls,
            spool_dir=config.spool_dir,
            **config.delivery_options(),
        )

    def flush(self, timeout_s: float) -> bool:
        return self.client.flush(timeout_s=timeout_s) if self.client is not None else True

    def close(self, timeout_s: float) -> DeliveryReport | None:
        client, self.client = self.client, None
        return client.close(timeout_s=timeout_s) if client is not None else None


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null, tuples lists, tensors lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # a tensor or an array
        return json_safe(tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
