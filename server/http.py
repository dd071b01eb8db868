"""The HTTP side: ``/metrics``, ``/healthz`` and the live page.

A small threaded WSGI server on its own daemon thread, so a scrape never
waits for the gRPC event loop nor delays it beyond the GIL. Slow or idle
connections cannot exhaust the process's file descriptors (and so take gRPC
down with them): each socket operation times out after ``timeout_s``, a
connection is closed after ``connection_max_s`` whatever it does, and past
``max_connections`` open ones a new connection is answered 503 and closed.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# the text exposition format /metrics answers with when given a render function
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StartResponse = Callable[..., Any]
log = logging.getLogger("inversion_monitor.server")
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(getattr(self.server, "timeout_s", None))

    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most ``max_connections`` at once, none older than
    ``connection_max_s`` (checked by the serving loop every poll interval)."""

    allow_reuse_address = True
    request_queue_size = 64
    timeout_s: float = 10.0
    connection_max_s: float = 60.0
    max_connections: int = 128

    def server_activate(self) -> None:
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        super().server_activate()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = len(self._open) >= self.max_connections
            if not full:
                self._open[request] = time.monotonic()
        if full:  # refuse at once: the descriptor is freed now, not after a timeout
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Cut connections open longer than ``connection_max_s`` (a trickling client)."""
        cutoff = time.monotonic() - self.connection_max_s
        with self._open_lock:
            old = [sock for sock, opened in self._open.items() if opened < cutoff]
        for sock in old:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not an error; anything else is logged."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("error while serving an HTTP request")


class _Server4(_BoundedServer):
    address_family = socket.AF_INET


class _Server6(_BoundedServer):
    address_family = socket.AF_INET6


def connection_cap(wanted: int) -> int:
    """``wanted``, but at most a quarter of the open-file limit (gRPC and SQLite need the rest).

    >>> 1 <= connection_cap(128) <= 128
    True
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return wanted
    return max(1, min(wanted, soft // 4))


def make_app(
    registry: CollectorRegistry | Callable[[], bytes],
    health: Callable[[], str],
    other: Callable[..., Iterable[bytes]] | None = None,
    metrics_authorize: Callable[[str | None], bool] | None = None,
) -> Callable[..., Any]:
    """WSGI app: ``/metrics`` -> exposition, ``/healthz`` -> 200 ``ok`` or 503, else ``other``.

    With ``metrics_authorize`` (the server's ``metrics_token``), ``/metrics``
    answers 401 unless it approves the request's ``Authorization`` header.

    ``other`` (the live page and its API, :mod:`.page`) answers every other
    path; without it they get 404.

    ``registry`` is a prometheus_client registry or a function that renders the
    whole text exposition. ``health()`` says ``ok``, or why not (``degraded:
    ...``, ``unavailable``): anything but ``ok`` answers 503 with that text.

    >>> from prometheus_client import CollectorRegistry
    >>> app = make_app(CollectorRegistry(), lambda: "ok")
    >>> seen = []
    >>> app({"PATH_INFO": "/healthz", "REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s))
    [b'ok\\n']
    >>> seen
    ['200 OK']
    """
    metrics: Callable[..., Iterable[bytes]]
    if isinstance(registry, CollectorRegistry):
        metrics = make_wsgi_app(registry)
    else:
        render = registry

        def metrics(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            body = render()
            start_response(
                "200 OK",
                [("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(body)))],
            )
            return [body]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if metrics_authorize is not None and not metrics_authorize(
                environ.get("HTTP_AUTHORIZATION")
            ):
                start_response(
                    "401 Unauthorized",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("WWW-Authenticate", 'Bearer realm="inversion-monitor"'),
                    ],
                )
                return [b"/metrics needs 'Authorization: Bearer <token>' reading every project\n"]
            result: Iterable[bytes] = metrics(environ, start_response)
            return result
        if path == "/healthz":
            state = health()
            start_response(
                "200 OK" if state == "ok" else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [state.encode() + b"\n"]
        if other is not None:
            return other(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class HttpEndpoint:
    """Serves :func:`make_app` on ``host:port`` (0: a free port) from a daemon thread.

    >>> from prometheus_client import CollectorRegistry
    >>> ep = HttpEndpoint(CollectorRegistry(), lambda: "ok", "127.0.0.1", 0)
    >>> ep.port > 0
    True
    >>> ep.stop()
    """

    def __init__(
        self,
        registry: CollectorRegistry | Callable[[], bytes],
        health: Callable[[], str],
        host: str,
        port: int,
        other: Callable[..., Iterable[bytes]] | None = None,
        *,
        metrics_authorize: Callable[[str | None], bool] | None = None,
        max_connections: int = 128,
        timeout_s: float = 10.0,
        connection_max_s: float = 60.0,
    ) -> None:
        base = _Server6 if ":" in host else _Server4
        server_class = type(
            base.__name__,
            (base,),
            {
                "max_connections": connection_cap(max_connections),
                "timeout_s": timeout_s,
                "connection_max_s": connection_max_s,
            },
        )
        self._server: _BoundedServer = make_server(
            host,
            port,
            make_app(registry, health, other, metrics_authorize),
            server_class=server_class,
            handler_class=_QuietHandler,
        )
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="inversion-monitor-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """HTTP connections open now (each holds a file descriptor and a thread)."""
        return self._server.open_connections

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop accepting, wait for the serving thread, close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()
