"""Read-only JSON over HTTP: ``ListRuns`` and ``GetRun`` for the live page and scripts.

``GET /api/runs[?project=P&limit=N]`` answers the ``ListRunsResponse`` and
``GET /api/runs/<run id or display name>[?history=N&samples=0]`` the
``GetRunResponse``, each in the protobuf JSON mapping with the proto's own
field names (64-bit integers such as ``step`` are strings, as that mapping
says). Both call the gRPC servicer's own ``ListRuns`` and ``GetRun`` on the
server's event loop, with an :class:`HttpCallContext` in place of the gRPC
context, so the answers (and any per-token scoping the servicer applies to
the call's ``authorization`` metadata) are those of the RPCs. ``samples=0`` leaves out the raw token
samples of the history records (the page does not draw them). The history is
the newest records within an eighth of the server's ``max_history_bytes``
(JSON costs more than protobuf), streamed a record at a time (no whole-history
document in memory). Every answer
carries ``X-Max-History``, the most ``history`` the server gives (its
``max_history``), so a client can ask for no more. Both answers say whether
the byte cap cut them: ``"truncated"`` and ``"max_bytes"`` (the cap) in the
body, and ``X-Truncated: true`` or ``false`` as a header; a cut history
comes whole with ``samples=0`` or a smaller ``history``.

When the server has tokens, every ``/api/`` request needs
``Authorization: Bearer <token>`` with a token the gRPC calls would accept
(a read-only one suffices: the API only reads); otherwise it answers 401.

>>> api = RunsApi(None, None, authorize=lambda header: header == "Bearer s3cret")
>>> seen = []
>>> body = api({"PATH_INFO": "/api/runs", "REQUEST_METHOD": "GET"},
...            lambda status, headers: seen.append(status))
>>> seen, json.loads(b"".join(body))["error"]["code"]
(['401 Unauthorized'], 'UNAUTHENTICATED')
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.hosts import host_allowed

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.server.service import MonitorServicer

log = logging.getLogger("inversion_monitor.server")

StartResponse = Callable[..., Any]
# the Authorization header (None: absent) -> may this caller read runs?
Authorize = Callable[[str | None], bool]

PREFIX = "/api/runs"
# JSON of token samples costs ~4 s of CPU per MB of records: a history answered as JSON
# gets this fraction (1/JSON_HISTORY_SHARE) of the server's max_history_bytes
JSON_HISTORY_SHARE = 8
_HTTP_STATUS = {
    "INVALID_ARGUMENT": "400 Bad Request",
    "UNAUTHENTICATED": "401 Unauthorized",
    "PERMISSION_DENIED": "403 Forbidden",
    "NOT_FOUND": "404 Not Found",
    "METHOD_NOT_ALLOWED": "405 Method Not Allowed",
    "RESOURCE_EXHAUSTED": "429 Too Many Requests",
    "UNAVAILABLE": "503 Service Unavailable",
}
_JSON_HEADERS = [
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]


def to_json(message: Message) -> dict[str, Any]:
    """A response as the JSON object the API sends (proto field names, defaults included).

    >>> to_json(monitor_pb2.ListRunsResponse(truncated=True, max_bytes=1024))
    {'truncated': True, 'max_bytes': '1024', 'runs': []}
    """
    data: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


class ApiError(Exception):
    """An HTTP answer other than 200, with a gRPC-style code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HttpCallContext:
    """The part of a ``grpc.aio.ServicerContext`` the servicer's reads use, for an HTTP call.

    It hands the request's ``Authorization`` header to the servicer as the
    call's ``authorization`` metadata, and turns ``abort`` into :class:`ApiError`.

    >>> HttpCallContext("Bearer t").invocation_metadata()
    (('authorization', 'Bearer t'),)
    """

    def __init__(self, authorization: str | None) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            () if authorization is None else (("authorization", authorization),)
        )

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(
        self, code: Any, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> NoReturn:
        raise ApiError(str(getattr(code, "name", code)), details)


class RunsApi:
    """WSGI app of ``/api/runs`` and ``/api/runs/<run>`` (GET only).

    Args:
        servicer: the server's :class:`~.service.MonitorServicer`.
        loop: the event loop it serves on (the gRPC server's).
        authorize: None when the server has no tokens; else a check of the
            ``Authorization`` header.
        max_history: the server's ``max_history`` (sent as ``X-Max-History``).
        timeout_s: how long one request waits for the service.
    """

    def __init__(
        self,
        servicer: MonitorServicer | None,
        loop: asyncio.AbstractEventLoop | None,
        *,
        authorize: Authorize | None = None,
        max_history: int | None = None,
        timeout_s: float = 10.0,
        allowed_hosts: frozenset[str] | None = None,
        max_history_bytes: int | None = None,
    ) -> None:
        self._servicer = servicer
        self._loop = loop
        self._authorize = authorize
        self._allowed_hosts = allowed_hosts
        self._json_history_bytes = (
            None if max_history_bytes is None else max_history_bytes // JSON_HISTORY_SHARE
        )
        self._max_history = max_history
        self._timeout_s = timeout_s

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        history: Sequence[Message] | None = None
        try:
            body = self._answer(environ)
            if isinstance(body, monitor_pb2.GetRunResponse):
                body, history = _split_history(body)
            status = "200 OK"
        except ApiError as exc:
            status = _HTTP_STATUS.get(exc.code, "500 Internal Server Error")
            body = {"error": {"code": exc.code, "message": exc.message}}
        headers = list(_JSON_HEADERS)
        if self._max_history is not None:
            headers.append(("X-Max-History", str(self._max_history)))
        if status == "200 OK":
            headers.append(("X-Truncated", "true" if body.get("truncated") else "false"))
        if status.startswith("401"):
            headers.append(("WWW-Authenticate", 'Bearer realm="inversion-monitor"'))
        if status.startswith("405"):
            headers.append(("Allow", "GET, HEAD"))
        head = environ.get("REQUEST_METHOD") == "HEAD"
        if history is not None:  # streamed a record at a time, no Content-Length
            start_response(status, headers)
            return [b""] if head else _stream_run(body, history)
        data = json.dumps(body, separators=(",", ":")).encode()
        headers.append(("Content-Length", str(len(data))))
        start_response(status, headers)
        return [b""] if head else [data]

    def _answer(self, environ: dict[str, Any]) -> dict[str, Any] | monitor_pb2.GetRunResponse:
        header = environ.get("HTTP_AUTHORIZATION")
        if self._allowed_hosts is not None and not host_allowed(
            environ.get("HTTP_HOST"), self._allowed_hosts
        ):
            raise ApiError(
                "PERMISSION_DENIED",
                "this server has no tokens and answers /api only for a Host that is an IP "
                "address, localhost or a name given with --allowed-host (DNS-rebinding guard)",
            )
        if self._authorize is not None and not self._authorize(header):
            raise ApiError(
                "UNAUTHENTICATED",
                "missing or invalid bearer token: send 'Authorization: Bearer <token>' with a "
                "token the server was started with (--token); a read-only token suffices",
            )
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            raise ApiError("METHOD_NOT_ALLOWED", "the API is read-only: use GET")
        path = environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        context = HttpCallContext(header)
        if path in (PREFIX, PREFIX + "/"):
            listed = monitor_pb2.ListRunsRequest(
                project=_text(query, "project"), limit=_count(query, "limit")
            )
            return to_json(self._call("ListRuns", listed, context))
        if path.startswith(PREFIX + "/"):
            run = path[len(PREFIX) + 1 :]
            get = monitor_pb2.GetRunRequest(run=run, history_limit=_count(query, "history"))
            samples = _text(query, "samples") not in ("0", "false", "no")
            response: monitor_pb2.GetRunResponse = self._call(
                "GetRun", get, context, samples=samples, max_bytes=self._json_history_bytes
            )
            return response
        raise ApiError("NOT_FOUND", f"no API at {path[:80]!r}: try {PREFIX} or {PREFIX}/<run>")

    def _call(self, method: str, request: Any, context: HttpCallContext, **options: Any) -> Any:
        """Run the servicer's RPC method on its loop and wait for the answer."""
        if self._servicer is None or self._loop is None or self._loop.is_closed():
            raise ApiError("UNAVAILABLE", "the server is not serving; retry")
        call = getattr(self._servicer, method)(request, context, **options)
        try:
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
                call, self._loop
            )
        except RuntimeError as exc:  # the loop stopped
            call.close()
            raise ApiError("UNAVAILABLE", f"the server is stopping: {exc}") from exc
        try:
            return future.result(self._timeout_s)
        except ApiError:
            raise
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ApiError("UNAVAILABLE", f"no answer within {self._timeout_s:g} s; retry") from exc
        except Exception as exc:
            log.exception("unexpected error while serving an API request")
            raise ApiError("INTERNAL", "internal server error; see the log") from exc


def _split_history(
    response: monitor_pb2.GetRunResponse,
) -> tuple[dict[str, Any], Sequence[Message]]:
    """The response's JSON without ``history``, and the history records."""
    history = list(response.history)
    del response.history[:]
    body = to_json(response)
    body.pop("history", None)
    return body, history


def _stream_run(body: dict[str, Any], history: Sequence[Message]) -> Iterator[bytes]:
    """``body`` with ``"history": [...]`` last, one record's JSON at a time (bounded memory)."""
    head = json.dumps(body, separators=(",", ":"))
    yield (head[:-1] + ("," if body else "") + '"history":[').encode()
    for i, record in enumerate(history):
        text = json.dumps(to_json(record), separators=(",", ":"))
        yield (text if i == 0 else "," + text).encode()
    yield b"]}"


def _text(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[-1] if values else ""


def _count(query: dict[str, list[str]], name: str) -> int:
    """A non-negative integer query parameter (0 when absent: the server's default)."""
    text = _text(query, name)
    if not text:
        return 0
    # isdigit() alone accepts "²" and other digits int() refuses
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**32:
        raise ApiError(
            "INVALID_ARGUMENT", f"query parameter {name}={text[:20]!r}: expected a whole number"
        )
    return int(text)
