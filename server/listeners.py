"""The extension points for what reacts to runs and stored records (detectors, alerts).

A listener is called on the writer thread after each push's transaction has
committed, once per stored record, in arrival order. It must be quick (it
delays the acknowledgement of later pushes) and must not keep a reference to
the record past the call (copy what it needs). An exception in a listener is
logged and counted; it never fails the push nor stops the server.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from inversion_monitor.proto.v1 import monitor_pb2


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
