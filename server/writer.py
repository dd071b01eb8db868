"""The single writer thread: every state change and database write happens here.

Calls queue up from the event loop; the thread takes them in order. Pushes
that are waiting together go through :meth:`Ingestor.push_many` as one group,
in one transaction (group commit): under load many small pushes cost one
commit and a few GIL hand-offs, instead of one each. Each caller's future is
resolved only after the commit, on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.auth import FULL_ACCESS, Grant
from inversion_monitor.server.errors import RequestError
from inversion_monitor.server.ingest import Ingestor

log = logging.getLogger("inversion_monitor.server")
_T = TypeVar("_T")


@dataclass(slots=True)
class _Job:
    # a PushRequest (grouped) or a callable (alone)
    push: monitor_pb2.PushRequest | None
    call: Callable[[], Any] | None
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    grant: Grant = FULL_ACCESS


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():  # the caller gave up (cancelled); nothing to tell
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class WriterThread:
    """Runs jobs one at a time on a dedicated thread; groups consecutive pushes.

    >>> import asyncio
    >>> async def main() -> int:
    ...     writer = WriterThread()
    ...     value = await writer.call(lambda: 6 * 7)
    ...     writer.stop()
    ...     return value
    >>> asyncio.run(main())
    42
    """

    def __init__(self, max_group_records: int = 5000) -> None:
        self.ingestor: Ingestor | None = None
        self._max_group_records = max_group_records
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="inversion-monitor-writer", daemon=True
        )
        self._thread.start()

    def _submit(
        self,
        push: monitor_pb2.PushRequest | None,
        call: Callable[[], Any] | None,
        grant: Grant = FULL_ACCESS,
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(push, call, future, loop, grant))
        return future

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn()`` on the writer thread, alone; its exception propagates."""
        result: _T = await self._submit(None, fn)
        return result

    async def push(
        self, request: monitor_pb2.PushRequest, grant: Grant = FULL_ACCESS
    ) -> monitor_pb2.PushResponse:
        """Ingest one push (possibly in a group with others); raises its RequestError."""
        result: monitor_pb2.PushResponse = await self._submit(request, None, grant)
        return result

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the queued jobs, then end the thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _run(self) -> None:
        carry: list[_Job | None] = []  # a job taken while grouping, to run next
        while True:
            job = carry.pop() if carry else self._queue.get()
            if job is None:
                return
            if job.push is None:
                self._run_call(job)
                continue
            group = [job]
            records = len(job.push.records)
            while records < self._max_group_records:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt.push is None:
                    carry.append(nxt)
                    break
                group.append(nxt)
                records += len(nxt.push.records)
            self._run_group(group)

    def _run_call(self, job: _Job) -> None:
        assert job.call is not None
        outcome: tuple[asyncio.Future[Any], bool, Any]
        try:
            outcome = (job.future, True, job.call())
        except BaseException as exc:
            outcome = (job.future, False, exc)
        try:
            job.loop.call_soon_threadsafe(_settle, [outcome])
        except RuntimeError:  # the loop is closed: nobody waits any more
            log.debug("dropped a result for a closed event loop")

    def _run_group(self, group: list[_Job]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]]
        try:
            if self.ingestor is None:
                raise RuntimeError("the writer has no ingestor yet")
            requests = [job.push for job in group if job.push is not None]
            results = self.ingestor.push_many(requests, grants=[job.grant for job in group])
            outcomes = [
                (job.future, not isinstance(result, RequestError), result)
                for job, result in zip(group, results, strict=True)
            ]
        except BaseException as exc:
            outcomes = [(job.future, False, exc) for job in group]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for job, outcome in zip(group, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody waits any more
                log.debug("dropped %d results for a closed event loop", len(items))
