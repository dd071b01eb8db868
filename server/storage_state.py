"""Whether the database takes writes: the state behind ``/healthz`` and RESOURCE_EXHAUSTED.

A full disk (or another database failure) is logged once when it starts and
once when it ends, never per request; ``/healthz`` reports ``degraded`` in
between. The server keeps serving reads, answers writes with a retry hint,
and recovers by itself when a write succeeds again (a request, or the
server's own probe while degraded).
"""

from __future__ import annotations

import logging

from inversion_monitor.server.errors import RequestError, ResourceExhausted, Unavailable
from inversion_monitor.server.store_errors import DiskFull, StoreError, StreamMoved

log = logging.getLogger("inversion_monitor.server")

DISK_FULL_RETRY_S = 5.0
DATABASE_RETRY_S = 2.0
STREAM_MOVED_RETRY_S = 0.1


class StorageState:
    """Tracks database failures; turns them into gRPC errors and a health text.

    >>> state = StorageState()
    >>> state.health()
    'ok'
    >>> state.failed(DiskFull("database write failed: the disk is full")).code
    'RESOURCE_EXHAUSTED'
    >>> state.health()
    'degraded: database write failed: the disk is full'
    >>> state.recovered(); state.health()
    'ok'
    """

    def __init__(self) -> None:
        self.problem: str | None = None
        self._kind: type[StoreError] | None = None

    def failed(self, exc: StoreError) -> RequestError:
        """Note the failure (logged if the state changes) and return the error to answer.

        A write that raced another server on a shared database (:class:`StreamMoved`)
        is no failure of the database: answered UNAVAILABLE with a short retry, not noted.
        """
        if isinstance(exc, StreamMoved):
            return Unavailable(str(exc), retry_after_s=STREAM_MOVED_RETRY_S)
        kind = DiskFull if isinstance(exc, DiskFull) else StoreError
        if self._kind is not kind:
            if kind is DiskFull:
                log.error(
                    "database disk full: %s; answering writes with RESOURCE_EXHAUSTED until "
                    "space returns (clients keep buffering)",
                    exc,
                )
            else:
                log.error("database error: %s; answering writes with UNAVAILABLE", exc)
        self._kind = kind
        self.problem = str(exc)
        if kind is DiskFull:
            return ResourceExhausted(
                f"the server's disk is full, nothing was stored ({exc}); keep the records "
                "and retry later",
                retry_after_s=DISK_FULL_RETRY_S,
            )
        return Unavailable(
            f"database error, nothing was stored: {exc}", retry_after_s=DATABASE_RETRY_S
        )

    def recovered(self) -> None:
        """A write succeeded: back to healthy (logged once)."""
        if self._kind is not None:
            log.warning("database writable again after: %s", self.problem)
        self._kind = None
        self.problem = None

    def health(self) -> str:
        """``ok``, or ``degraded: <the failure>``."""
        return "ok" if self.problem is None else f"degraded: {self.problem}"
