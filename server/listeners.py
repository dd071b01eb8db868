"""The extension points for what reacts to runs and stored records (detectors, alerts).

A listener is called on the writer thread after each push's transaction has
committed, once per stored record, in arrival order. It must be quick (it
delays the acknowledgement of later pushes) and must not keep a reference to
the record past the call (copy what it needs). An exception in a listener is
logged and counted; it never fails the push nor stops the server.

A listener with ``on_values`` (:class:`ValuesListener`) gets the record's values as
the server read them once (:mod:`.record_values`) instead of the record: the
server's own listeners (alerts, the entropy law) do not read the record again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.limits import RateLimitedLog
from inversion_monitor.server.record_values import Observation


@runtime_checkable
class IngestListener(Protocol):
    """Receives every stored record.

    >>> class CountSteps:
    ...     def __init__(self) -> None:
    ...         self.seen: dict[str, int] = {}
    ...     def on_record(self, run_id: str, display_name: str, record) -> None:
    ...         self.seen[display_name] = record.step
    >>> isinstance(CountSteps(), IngestListener)
    True
    """

    def on_record(self, run_id: str, display_name: str, record: monitor_pb2.StepRecord) -> None:
        """Called once per stored (accepted, sanitised) record."""


@runtime_checkable
class ValuesListener(Protocol):
    """An ingest listener fed the values of each stored record (read once) instead of it.

    >>> class Steps:
    ...     def on_record(self, run_id: str, display_name: str, record) -> None: ...
    ...     def on_values(self, run_id: str, display_name: str, values) -> None:
    ...         self.step = values.step
    >>> isinstance(Steps(), ValuesListener)
    True
    """

    def on_record(self, run_id: str, display_name: str, record: monitor_pb2.StepRecord) -> None:
        """The record as it is stored (not called by the ingestor: :meth:`on_values` is)."""

    def on_values(self, run_id: str, display_name: str, values: Observation) -> None:
        """Called once per stored record, with what the server read of it (the same as
        :func:`~.record_values.read_values` of the stored record)."""


@runtime_checkable
class RunListener(Protocol):
    """Learns when each run enters and leaves the server's memory.

    An ingest listener that also has ``on_run_open`` and ``on_run_pruned`` is
    told of every run restored from the database at start-up, of each run
    OpenRun registers (once: a run keeps the :class:`~monitor_pb2.RunInfo` it
    was opened with, its kind included) and of each pruned run read back
    (:meth:`~.ingest.Ingestor.revive`); ``on_run_pruned`` says the run left
    memory (idle past retention), so what is kept per run stays bounded by
    retention and ``max_active_runs``. The same rules as ``on_record`` apply.

    >>> class Kinds:
    ...     def __init__(self) -> None:
    ...         self.kind: dict[str, str] = {}
    ...     def on_run_open(self, run_id: str, display_name: str, info) -> None:
    ...         self.kind[run_id] = info.kind
    ...     def on_run_pruned(self, run_id: str) -> None:
    ...         self.kind.pop(run_id, None)
    >>> isinstance(Kinds(), RunListener)
    True
    """

    def on_run_open(self, run_id: str, display_name: str, info: monitor_pb2.RunInfo) -> None:
        """Called when the run enters memory, with its stored (redacted) RunInfo."""

    def on_run_pruned(self, run_id: str) -> None:
        """Called when the run leaves memory; it may come back with ``on_run_open``."""


class Listeners:
    """Tells the listeners of stored records and of runs entering and leaving memory; each
    error is logged (at most one line per listener and type per 10 s) and counted.

    >>> seen = []
    >>> class Steps:
    ...     def on_record(self, run_id, display_name, record) -> None: seen.append(record.step)
    >>> fan = Listeners([Steps()], logging.getLogger("demo"))
    >>> rec = monitor_pb2.StepRecord(step=4)
    >>> from inversion_monitor.server.record_values import read_values
    >>> fan.records([("r", "demo", rec, read_values(rec))]); seen
    [4]
    """

    def __init__(
        self,
        listeners: Sequence[IngestListener],
        log: logging.Logger,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._listeners = list(listeners)
        self._run_listeners = [x for x in self._listeners if isinstance(x, RunListener)]
        self._log = RateLimitedLog(log)
        self._on_error = on_error

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def records(
        self, stored: Sequence[tuple[str, str, monitor_pb2.StepRecord, Observation]]
    ) -> None:
        """Each listener, every stored (run_id, display name, record, values) in order."""
        for listener in self._listeners:
            on_values = getattr(listener, "on_values", None)
            for run_id, display_name, rec, values in stored:
                try:
                    if on_values is not None:
                        on_values(run_id, display_name, values)
                    else:
                        listener.on_record(run_id, display_name, rec)
                except Exception as exc:
                    self.failed(listener, exc)

    def run_open(self, run_id: str, display_name: str, info: monitor_pb2.RunInfo) -> None:
        for listener in self._run_listeners:
            try:
                listener.on_run_open(run_id, display_name, info)
            except Exception as exc:
                self.failed(listener, exc)

    def run_pruned(self, run_id: str) -> None:
        for listener in self._run_listeners:
            try:
                listener.on_run_pruned(run_id)
            except Exception as exc:
                self.failed(listener, exc)

    def failed(self, listener: object, exc: Exception) -> None:
        self._log.exception((id(listener), type(exc)), "ingest listener %r failed", listener)
        self._on_error()
