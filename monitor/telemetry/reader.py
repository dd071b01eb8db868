"""A small read client of the monitor server: ``GetRun`` and ``ListRuns``.

Used by the ``show`` and ``runs`` commands and the demo. A failed call raises
:class:`ReadError` with the status code's name and the server's details; the
command line turns it into one sentence (see :mod:`inversion_monitor.app.remote`).
Given several replicas of one store, a read that finds one unreachable
(``UNAVAILABLE``, ``DEADLINE_EXCEEDED``) asks the next; every replica shows
every run.
An answer the server's byte cap cut says so (``truncated``); :func:`truncation_note`
turns that into the line the commands print.

>>> reader = RunReader(Transport.create("127.0.0.1:9"), timeout_s=0.5)
>>> try:
...     reader.list_runs()
... except ReadError as exc:
...     exc.code
'UNAVAILABLE'
>>> reader.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.telemetry.transport import Transport

_NEXT_REPLICA = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ReadError(Exception):
    """A read call failed: ``code`` is the gRPC status name, ``details`` the server's text.

    >>> str(ReadError("NOT_FOUND", "no run 'x'"))
    "NOT_FOUND: no run 'x'"
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def truncation_note(
    response: monitor_pb2.GetRunResponse | monitor_pb2.ListRunsResponse,
    asked: int,
    *,
    fewer: str = "",
) -> str | None:
    """One line saying the server's byte cap cut ``response`` (None when it did not).

    ``asked``: the records (``GetRun``) or runs (``ListRuns``) the request asked for;
    ``fewer``: how the caller asks for fewer (e.g. ``" (--limit N)"``).

    >>> cut = monitor_pb2.GetRunResponse(truncated=True, max_bytes=2 << 20)
    >>> cut.history.add().step = 7
    >>> print(truncation_note(cut, 40))  # doctest: +ELLIPSIS
    truncated: 1 of the 40 records asked for fit the server's byte cap (2 MiB); ask for fewer...
    >>> truncation_note(monitor_pb2.ListRunsResponse(), 100) is None
    True
    """
    if not response.truncated:
        return None
    if isinstance(response, monitor_pb2.GetRunResponse):
        held, what = len(response.history), "records"
    else:
        held, what = len(response.runs), "runs"
    cap = response.max_bytes
    size = f"{cap / (1 << 20):g} MiB" if cap >= 1 << 20 else f"{cap / 1024:g} KiB"
    return (
        f"truncated: {held} of the {asked} {what} asked for fit the server's byte cap "
        f"({size}); ask for fewer{fewer}, or raise the server's max_history_bytes"
    )


class RunReader:
    """Reads runs from a server (or the first of several replicas that answers); usable
    as a context manager (closes its channels).

    >>> with RunReader(Transport.create("127.0.0.1:9"), timeout_s=0.5) as reader:
    ...     reader.timeout_s
    0.5
    """

    def __init__(
        self, transport: Transport | Sequence[Transport], *, timeout_s: float = 10.0
    ) -> None:
        self.transports = (transport,) if isinstance(transport, Transport) else tuple(transport)
        if not self.transports:
            raise ValueError("RunReader needs at least one transport")
        self.timeout_s = timeout_s
        self._index = 0
        self._channel = self.transport.channel()
        self._stub = self.transport.stub(self._channel)

    @property
    def transport(self) -> Transport:
        """The transport of the server read from now."""
        return self.transports[self._index]

    def get_run(self, run: str, *, history_limit: int = 20) -> monitor_pb2.GetRunResponse:
        """One run (by id or display name) with its recent records and alerts."""
        request = monitor_pb2.GetRunRequest(run=run, history_limit=history_limit)
        response: monitor_pb2.GetRunResponse = self._call("GetRun", request)
        return response

    def list_runs(self, *, project: str = "", limit: int = 100) -> monitor_pb2.ListRunsResponse:
        """Run summaries, newest activity first (only ``project``'s when given)."""
        request = monitor_pb2.ListRunsRequest(project=project, limit=limit)
        response: monitor_pb2.ListRunsResponse = self._call("ListRuns", request)
        return response

    def _call(self, method: str, request: object) -> Any:
        for tried in range(len(self.transports)):
            call: grpc.UnaryUnaryMultiCallable = getattr(self._stub, method)
            try:
                return call(request, timeout=self.timeout_s, metadata=self.transport.metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _NEXT_REPLICA and tried + 1 < len(self.transports):
                    self._next_replica()
                    continue
                name = code.name if code is not None else "UNKNOWN"
                raise ReadError(name, str(exc.details() or "")) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _next_replica(self) -> None:
        self._channel.close()
        self._index = (self._index + 1) % len(self.transports)
        self._channel = self.transport.channel()
        self._stub = self.transport.stub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
