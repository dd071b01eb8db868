"""The ``MonitorService`` gRPC servicer (grpc.aio) and the bearer-token interceptor.

State changes run on the single writer thread (:class:`~.ingest.Ingestor`);
history reads on a reader thread with its own SQLite connection; the event
loop only parses, dispatches and answers. Every failure becomes a gRPC status:
the service never lets an exception escape into the server. Requests are
parsed with unknown fields discarded, so nothing the schema does not know is
stored or kept in memory. Each call's token gives its :class:`~.auth.Grant`:
the projects it reads and whether it may write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import Histogram

from inversion_monitor.proto.v1 import monitor_pb2, monitor_pb2_grpc
from inversion_monitor.server.alerts import AlertEngine
from inversion_monitor.server.archive import recent_run_ids
from inversion_monitor.server.auth import FULL_ACCESS, Authorizer, Grant
from inversion_monitor.server.config import Limits
from inversion_monitor.server.database import Connection
from inversion_monitor.server.errors import (
    InvalidArgument,
    NotFound,
    RequestError,
    ResourceExhausted,
    Unavailable,
)
from inversion_monitor.server.history import read_history_capped
from inversion_monitor.server.ingest import Ingestor, RunView
from inversion_monitor.server.limits import InflightBytes
from inversion_monitor.server.schema import StoreError
from inversion_monitor.server.storage_state import StorageState
from inversion_monitor.server.writer import WriterThread

log = logging.getLogger("inversion_monitor.server")

SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000
DEFAULT_HISTORY = 100
_T = TypeVar("_T")


def status_details(code: str, message: str, retry_after_s: float | None) -> bytes:
    """``grpc-status-details-bin``: a ``google.rpc.Status``, with ``RetryInfo`` if given."""
    status = status_pb2.Status(code=code_pb2.Code.Value(code), message=message)
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=int(retry_after_s), nanos=int((retry_after_s % 1) * 1e9)
            )
        )
        status.details.add().Pack(info)
    data: bytes = status.SerializeToString()
    return data


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """End the call with the error's status code and message (and RetryInfo)."""
    trailing: tuple[tuple[str, bytes], ...] = ()
    if error.retry_after_s is not None:
        trailing = (
            (
                "grpc-status-details-bin",
                status_details(error.code, error.message, error.retry_after_s),
            ),
        )
    await context.abort(getattr(grpc.StatusCode, error.code), error.message, trailing)


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    """Answers the five RPCs of ``inversion_monitor.v1.MonitorService``."""

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        writer: WriterThread,
        reader: Callable[[Callable[[], Any]], Awaitable[Any]],
        read_connection: Callable[[], Connection],
        push_latency: Histogram,
        max_pending: int,
        max_history: int,
        alerts: AlertEngine | None = None,
        authorizer: Authorizer | None = None,
        storage: StorageState | None = None,
        max_history_bytes: int = Limits().max_history_bytes,
        max_inflight_push_bytes: int = Limits().max_inflight_push_bytes,
    ) -> None:
        self._ingestor = ingestor
        self._authorizer = authorizer or Authorizer()
        self.storage = storage or StorageState()
        self._alerts = alerts
        self._writer = writer
        self._reader = reader
        self._read_connection = read_connection
        self._push_latency = push_latency
        self._max_pending = max_pending
        self._max_history = max_history
        # also the byte cap of a ListRuns answer
        self._max_history_bytes = max_history_bytes
        self._inflight = InflightBytes(max_inflight_push_bytes)
        self._pending = 0
        self.stopping = False

    @property
    def pending(self) -> int:
        """Writes queued for or running on the writer thread."""
        return self._pending

    async def _write(self, job: Callable[[], Awaitable[_T]]) -> _T:
        if self.stopping:
            raise Unavailable("the server is shutting down; retry", retry_after_s=1.0)
        if self._pending >= self._max_pending:
            raise ResourceExhausted(
                f"server busy: {self._pending} requests queued for the writer "
                f"(max_pending_pushes={self._max_pending}); retry shortly",
                retry_after_s=0.25,
            )
        self._pending += 1
        try:
            result = await job()
        except StoreError as exc:
            raise self.storage.failed(exc) from None
        finally:
            self._pending -= 1
        if self.storage.problem is not None:
            self.storage.recovered()
        return result

    def _grant(self, context: grpc.aio.ServicerContext) -> Grant:
        if not self._authorizer.enabled:
            return FULL_ACCESS
        grant = self._authorizer.grant(context.invocation_metadata())
        # the interceptor already turned away unknown tokens
        return grant if grant is not None else Grant(frozenset(), write=False)

    async def _guard(
        self,
        context: grpc.aio.ServicerContext,
        request: object,
        call: Callable[[], Awaitable[_T]],
    ) -> _T:
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidArgument(request.message)
            return await call()
        except RequestError as exc:
            await abort(context, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error while serving a request")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the log")
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    async def OpenRun(
        self, request: monitor_pb2.OpenRunRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.OpenRunResponse:
        grant = self._grant(context)
        return await self._guard(
            context,
            request,
            lambda: self._write(
                lambda: self._writer.call(partial(self._ingestor.open_run, request, grant=grant))
            ),
        )

    async def CloseRun(
        self, request: monitor_pb2.CloseRunRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.CloseRunResponse:
        grant = self._grant(context)
        return await self._guard(
            context,
            request,
            lambda: self._write(
                lambda: self._writer.call(partial(self._ingestor.close_run, request, grant=grant))
            ),
        )

    async def Push(
        self, request: monitor_pb2.PushRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.PushResponse:
        start = time.perf_counter()
        grant = self._grant(context)

        async def call() -> monitor_pb2.PushResponse:
            # the request's bytes stay held until the writer has stored them
            size = request.ByteSize() if isinstance(request, monitor_pb2.PushRequest) else 0
            with self._inflight.hold(size):
                return await self._write(lambda: self._writer.push(request, grant))

        try:
            return await self._guard(context, request, call)
        finally:
            self._push_latency.observe(time.perf_counter() - start)

    async def ListRuns(
        self, request: monitor_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ListRunsResponse:
        grant = self._grant(context)

        async def call() -> monitor_pb2.ListRunsResponse:
            limit = request.limit or DEFAULT_LIST_LIMIT
            if limit > MAX_LIST_LIMIT:
                raise InvalidArgument(f"limit is {limit}; the maximum is {MAX_LIST_LIMIT}")

            def matching() -> list[RunView]:
                return [
                    v
                    for v in list(self._ingestor.views.values())
                    if (not request.project or v.info.project == request.project)
                    and grant.allows(v.info.project)
                ]

            views = matching()
            if len(views) < limit:  # older runs were pruned from memory: read them back
                in_memory = set(self._ingestor.views)
                try:
                    older = await self._reader(
                        lambda: recent_run_ids(
                            self._read_connection(),
                            limit - len(views),
                            project=request.project or None,
                            projects=grant.projects,
                            exclude=in_memory,
                        )
                    )
                except StoreError as exc:
                    raise Unavailable(str(exc)) from exc
                if older:
                    await self._writer.call(partial(self._ingestor.revive_all, older))
                    views = matching()
            views.sort(key=lambda v: v.last_activity, reverse=True)
            response = monitor_pb2.ListRunsResponse(max_bytes=self._max_history_bytes)
            size = 0
            for view in views[:limit]:
                summary = response.runs.add()
                fill_summary(summary, view, self._alerts)
                size += summary.ByteSize()
                if size > self._max_history_bytes:  # the newest runs that fit the byte cap
                    del response.runs[-1]
                    response.truncated = True
                    break
            return response

        return await self._guard(context, request, call)

    async def GetRun(
        self,
        request: monitor_pb2.GetRunRequest,
        context: grpc.aio.ServicerContext,
        *,
        samples: bool = True,
        max_bytes: int | None = None,
    ) -> monitor_pb2.GetRunResponse:
        """The run's summary and newest history (``samples=False``: without token samples;
        ``max_bytes``: a tighter byte cap than the server's, e.g. for JSON)."""
        grant = self._grant(context)

        async def call() -> monitor_pb2.GetRunResponse:
            view = find_run(self._ingestor, request.run, grant)
            if view is None:  # pruned from memory (past retention): read it back
                await self._writer.call(partial(self._ingestor.revive, request.run, by_name=True))
                view = find_run(self._ingestor, request.run, grant)
            if view is None:  # others' runs: not found, as unknown ones
                raise NotFound(f"no run with id or display name {request.run[:80]!r}")
            limit = request.history_limit or DEFAULT_HISTORY
            if limit > self._max_history:
                raise InvalidArgument(
                    f"history_limit is {limit}; max_history is {self._max_history}"
                )
            cap = min(self._max_history_bytes, max_bytes or self._max_history_bytes)
            try:
                history, truncated = await self._reader(
                    lambda: read_history_capped(
                        self._read_connection(),
                        view.pk,
                        limit,
                        cap,
                        samples=samples,
                        max_read_bytes=4 * self._max_history_bytes,
                    )
                )
            except StoreError as exc:
                raise Unavailable(str(exc)) from exc
            response = monitor_pb2.GetRunResponse(truncated=truncated, max_bytes=cap)
            fill_summary(response.summary, view, self._alerts)
            if self._alerts is not None:
                response.alerts.extend(self._alerts.alerts(view.run_id))
            response.history.extend(history)
            return response

        return await self._guard(context, request, call)


def find_run(ingestor: Ingestor, run: str, grant: Grant) -> RunView | None:
    """The run ``run`` names (a run id or a display name) among those ``grant`` reads.

    A run id equal to another run's display name (only a run opened after that
    name was given can be one: names avoid existing ids) does not hide that
    run: of two matches the older wins.
    """
    views = ingestor.views
    by_id = views.get(run)
    name_id = ingestor.by_name.get(run)
    by_name = views.get(name_id) if name_id is not None else None
    found = [v for v in (by_id, by_name) if v is not None and grant.allows(v.info.project)]
    return min(found, key=lambda v: v.opened_time) if found else None


class MalformedRequest:
    """Stands in for a request whose bytes did not parse; the method answers INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(message_type: Any) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            message = message_type.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(
                f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}"
            )
        # fields this schema does not know are neither stored nor kept in memory
        message.DiscardUnknownFields()
        return message

    return parse


def add_monitor_service(servicer: MonitorServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated code does, but parse requests leniently.

    A request that is not valid protobuf gets INVALID_ARGUMENT from the method
    instead of an UNKNOWN status and a logged traceback from gRPC.
    """
    methods: dict[str, tuple[Any, Any]] = {
        "OpenRun": (monitor_pb2.OpenRunRequest, monitor_pb2.OpenRunResponse),
        "Push": (monitor_pb2.PushRequest, monitor_pb2.PushResponse),
        "CloseRun": (monitor_pb2.CloseRunRequest, monitor_pb2.CloseRunResponse),
        "ListRuns": (monitor_pb2.ListRunsRequest, monitor_pb2.ListRunsResponse),
        "GetRun": (monitor_pb2.GetRunRequest, monitor_pb2.GetRunResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_lenient(request_type),
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def fill_summary(
    out: monitor_pb2.RunSummary, view: RunView, alerts: AlertEngine | None = None
) -> None:
    """Copy a run's snapshot (and active alerts) into a ``RunSummary`` (no token samples)."""
    out.run.CopyFrom(view.info)
    out.display_name = view.display_name
    out.opened_time = view.opened_time
    out.last_update_time = view.last_update_time or 0.0
    out.status = view.status
    out.records = view.records
    if view.latest is not None:
        out.latest.CopyFrom(view.latest)
    if alerts is not None:
        out.active_alerts.extend(alerts.active(view.run_id))


# ---------------------------------------------------------------- auth

_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through when ``authorization: Bearer <token>`` names a configured token.

    Health checking and reflection stay open. Others get ``UNAUTHENTICATED``.
    What a known token may do is the servicer's business (:class:`~.auth.Grant`).

    >>> BearerTokenInterceptor(["s3cret"]).allowed((("authorization", "Bearer s3cret"),))
    True
    >>> BearerTokenInterceptor(["s3cret"]).allowed((("authorization", "Bearer nope"),))
    False
    """

    def __init__(self, tokens: Sequence[str] | Authorizer) -> None:
        self._authorizer = tokens if isinstance(tokens, Authorizer) else Authorizer(tokens)
        if not self._authorizer.enabled:
            raise ValueError("BearerTokenInterceptor needs at least one token")

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>' "
                "with a token the server was started with (--token or --token-file)",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        return self._authorizer.grant(metadata) is not None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(_OPEN_PREFIXES) or self.allowed(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        return self._deny
