"""The writer's in-memory state of runs and ranks, and the snapshots readers get.

:class:`RunState` and :class:`RankState` belong to the writer thread
(:class:`~.ingest.Ingestor`); :class:`RunView` is the immutable snapshot of a
run any thread may read; :class:`Counters` are the server-wide totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.validate import RejectReason


@dataclass(slots=True)
class RankState:
    acked: int = 0
    # sequences persisted or rejected for good above ``acked``
    pending: set[int] = field(default_factory=set)
    latest_sequence: int = 0
    # the record with the highest sequence, without token samples, its probe fields
    # (inversion, entropy, score, ...) from latest_probe when it has none; never mutated
    latest: monitor_pb2.StepRecord | None = None
    # the probe record (one with ``inversion``) with the highest sequence
    latest_probe_sequence: int = 0
    latest_probe: monitor_pb2.StepRecord | None = None
    status: str = "running"
    # SHA-256 digests of the writer session and of the one it replaced
    session: str | None = None
    previous_session: str | None = None
    # Unix time of the session's last OpenRun or Push
    session_time: float = 0.0


@dataclass(slots=True)
class RunState:
    pk: int
    run_id: str
    display_name: str
    info: monitor_pb2.RunInfo
    world_size: int
    opened_time: float
    last_update_time: float | None
    last_activity: float
    status: str
    records: int
    ranks: dict[int, RankState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunView:
    """An immutable snapshot of one run, safe to read from any thread."""

    run_id: str
    pk: int
    display_name: str
    info: monitor_pb2.RunInfo
    opened_time: float
    last_update_time: float | None
    last_activity: float
    status: str
    records: int
    # latest record of the lowest rank that has one: what /metrics shows
    metrics_record: monitor_pb2.StepRecord | None
    # the most recent record of any rank (highest step, then lowest rank)
    latest: monitor_pb2.StepRecord | None
    # series.ALL_GAUGES read from metrics_record
    values: tuple[float | None, ...]
    # the run's /metrics lines (series.run_lines), made on the writer thread
    lines: tuple[str, ...] = ()


@dataclass
class Counters:
    """Server-wide totals since start; plain ints written by the writer thread only."""

    ingested: int = 0
    # push transactions committed (several pushes may share one: group commit)
    commits: int = 0
    duplicates: int = 0
    nonfinite: int = 0
    listener_errors: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in RejectReason})


def stripped(record: monitor_pb2.StepRecord) -> monitor_pb2.StepRecord:
    """A copy of ``record`` without its token samples."""
    copy = monitor_pb2.StepRecord()
    copy.CopyFrom(record)
    copy.ClearField("samples")
    return copy


PROBE_MESSAGES = ("inversion", "entropy", "score")
PROBE_VALUES = ("spearman_per_token_type", "probe_seconds", "probe_precision")


def with_last_probe(
    record: monitor_pb2.StepRecord, probe: monitor_pb2.StepRecord | None
) -> monitor_pb2.StepRecord:
    """``record`` without samples; a health-only one takes ``probe``'s inversion fields.

    A health record comes every optimizer step and the probe's only on some:
    the run's latest view (its gauges, ListRuns) keeps the last probe's values
    beside the newest health values instead of blanking them.

    >>> probe = monitor_pb2.StepRecord(step=10)
    >>> probe.inversion.spearman.value = -0.5
    >>> view = with_last_probe(monitor_pb2.StepRecord(step=11, loss=2.0), probe)
    >>> view.step, view.loss, view.inversion.spearman.value
    (11, 2.0, -0.5)
    """
    copy = stripped(record)
    if probe is None or record.HasField("inversion"):
        return copy
    for name in PROBE_MESSAGES:
        if probe.HasField(name):
            getattr(copy, name).CopyFrom(getattr(probe, name))
    copy.components.extend(probe.components)
    for name in PROBE_VALUES:
        if probe.HasField(name):
            setattr(copy, name, getattr(probe, name))
    return copy
