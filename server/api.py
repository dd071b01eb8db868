"""Read-only JSON over HTTP: ``ListRuns`` and ``GetRun`` for the live page and scripts.

``GET /api/runs[?project=P&limit=N]`` answers the ``ListRunsResponse`` and
``GET /api/runs/<run id or display name>[?history=N&samples=0]`` the
``GetRunResponse``, each in the protobuf JSON mapping with the proto's own
field names (64-bit integers such as ``step`` are strings, as that mapping
says). Both run the gRPC service's own methods on the server's event loop, so
the numbers are those of the RPCs. ``samples=0`` leaves out the raw token
samples of the history records (the page does not draw them). Every answer
carries ``X-Max-History``, the most ``history`` the server gives (its
``max_history``), so a client can ask for no more.

When the server has tokens, every ``/api/`` request needs
``Authorization: Bearer <token>`` with a token the gRPC calls would accept
(a read-only one suffices: the API only reads); otherwise it answers 401.

>>> api = RunsApi(None, None, None, authorize=lambda header: header == "Bearer s3cret")
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
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import parse_qs

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from inversion_monitor.proto.v1 import monitor_pb2
from inversion_monitor.server.errors import RequestError

log = logging.getLogger("inversion_monitor.server")

StartResponse = Callable[..., Any]
ListRuns = Callable[
    [monitor_pb2.ListRunsRequest], Coroutine[Any, Any, monitor_pb2.ListRunsResponse]
]
GetRun = Callable[[monitor_pb2.GetRunRequest], Coroutine[Any, Any, monitor_pb2.GetRunResponse]]
# the Authorization header (None: absent) -> may this caller read runs?
Authorize = Callable[[str | None], bool]

PREFIX = "/api/runs"
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

    >>> to_json(monitor_pb2.ListRunsResponse())
    {'runs': []}
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


class RunsApi:
    """WSGI app of ``/api/runs`` and ``/api/runs/<run>`` (GET only).

    Args:
        list_runs, get_run: the servicer's ``list_runs`` and ``get_run`` coroutines.
        loop: the event loop they run on (the gRPC server's).
        authorize: None when the server has no tokens; else a check of the
            ``Authorization`` header.
        max_history: the server's ``max_history`` (sent as ``X-Max-History``).
        timeout_s: how long one request waits for the service.
    """

    def __init__(
        self,
        list_runs: ListRuns | None,
        get_run: GetRun | None,
        loop: asyncio.AbstractEventLoop | None,
        *,
        authorize: Authorize | None = None,
        max_history: int | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._max_history = max_history
        self._list_runs = list_runs
        self._get_run = get_run
        self._loop = loop
        self._authorize = authorize
        self._timeout_s = timeout_s

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            body = self._answer(environ)
            status = "200 OK"
        except ApiError as exc:
            status = _HTTP_STATUS.get(exc.code, "500 Internal Server Error")
            body = {"error": {"code": exc.code, "message": exc.message}}
        headers = list(_JSON_HEADERS)
        if self._max_history is not None:
            headers.append(("X-Max-History", str(self._max_history)))
        if status.startswith("401"):
            headers.append(("WWW-Authenticate", 'Bearer realm="inversion-monitor"'))
        if status.startswith("405"):
            headers.append(("Allow", "GET, HEAD"))
        data = json.dumps(body, separators=(",", ":")).encode()
        headers.append(("Content-Length", str(len(data))))
        start_response(status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [data]

    def _answer(self, environ: dict[str, Any]) -> dict[str, Any]:
        if self._authorize is not None and not self._authorize(environ.get("HTTP_AUTHORIZATION")):
            raise ApiError(
                "UNAUTHENTICATED",
                "missing or invalid bearer token: send 'Authorization: Bearer <token>' with a "
                "token the server was started with (--token); a read-only token suffices",
            )
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            raise ApiError("METHOD_NOT_ALLOWED", "the API is read-only: use GET")
        path = environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if path in (PREFIX, PREFIX + "/"):
            request = monitor_pb2.ListRunsRequest(
                project=_text(query, "project"), limit=_count(query, "limit")
            )
            return to_json(self._run(self._list_runs, request))
        if path.startswith(PREFIX + "/"):
            run = path[len(PREFIX) + 1 :]
            get = monitor_pb2.GetRunRequest(run=run, history_limit=_count(query, "history"))
            response = self._run(self._get_run, get)
            if _text(query, "samples") in ("0", "false", "no"):
                for record in response.history:
                    del record.samples[:]
            return to_json(response)
        raise ApiError("NOT_FOUND", f"no API at {path[:80]!r}: try {PREFIX} or {PREFIX}/<run>")

    def _run(self, method: Callable[[Any], Coroutine[Any, Any, Any]] | None, request: Any) -> Any:
        if method is None or self._loop is None or self._loop.is_closed():
            raise ApiError("UNAVAILABLE", "the server is not serving; retry")
        try:
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
                method(request), self._loop
            )
        except RuntimeError as exc:  # the loop stopped
            raise ApiError("UNAVAILABLE", f"the server is stopping: {exc}") from exc
        try:
            return future.result(self._timeout_s)
        except RequestError as exc:
            raise ApiError(exc.code, exc.message) from exc
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ApiError("UNAVAILABLE", f"no answer within {self._timeout_s:g} s; retry") from exc
        except Exception as exc:
            log.exception("unexpected error while serving an API request")
            raise ApiError("INTERNAL", "internal server error; see the log") from exc


def _text(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[-1] if values else ""


def _count(query: dict[str, list[str]], name: str) -> int:
    """A non-negative integer query parameter (0 when absent: the server's default)."""
    text = _text(query, name)
    if not text:
        return 0
    if not text.isdigit() or int(text) >= 2**32:
        raise ApiError(
            "INVALID_ARGUMENT", f"query parameter {name}={text[:20]!r}: expected a whole number"
        )
    return int(text)
