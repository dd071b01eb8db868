"""The HTTP side: ``/metrics``, ``/healthz`` and the live page.

A small threaded WSGI server on its own daemon thread, so a scrape never
waits for the gRPC event loop nor delays it beyond the GIL.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# the text exposition format /metrics answers with when given a render function
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""


class _Server4(ThreadingWSGIServer):
    address_family = socket.AF_INET
    allow_reuse_address = True


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True


def make_app(
    registry: CollectorRegistry | Callable[[], bytes],
    health: Callable[[], str],
    other: Callable[..., Iterable[bytes]] | None = None,
) -> Callable[..., Any]:
    """WSGI app: ``/metrics`` -> exposition, ``/healthz`` -> 200 ``ok`` or 503, else ``other``.

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
    ) -> None:
        server_class = _Server6 if ":" in host else _Server4
        self._server = make_server(
            host,
            port,
            make_app(registry, health, other),
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
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop accepting, wait for the serving thread, close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()
