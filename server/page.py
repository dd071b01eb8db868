"""The live page: ``/`` and its static files, plus the JSON API it reads (:mod:`.api`).

The page is plain HTML, CSS and JavaScript shipped as package data
(``server/static``, no build step) with uPlot vendored under
``static/vendor`` (see the README there). It polls ``/api/runs`` and
``/api/runs/<run>`` and redraws; the page itself holds no data, so it is
served without a token, and the API asks for one when the server has tokens.

>>> app = make_page_app(None)
>>> seen = []
>>> body = b"".join(app({"PATH_INFO": "/", "REQUEST_METHOD": "GET"},
...                     lambda status, headers: seen.append(status)))
>>> seen, b"<title>inversion-monitor</title>" in body
(['200 OK'], True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from inversion_monitor.server.api import RunsApi

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

STATIC_PREFIX = "/static/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}
# scripts and styles from this server only; uPlot sets element styles from script
_SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


@functools.cache
def static_files() -> dict[str, tuple[bytes, str]]:
    """``relative path -> (content, content type)`` of every shipped static file."""
    root = resources.files("inversion_monitor.server") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    pending = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                pending.append((name + "/", entry))
                continue
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if suffix in _TYPES:
                files[name] = (entry.read_bytes(), _TYPES[suffix])
    return files


def make_page_app(api: RunsApi | None) -> WsgiApp:
    """WSGI app of ``/``, ``/static/...`` and (given ``api``) ``/api/...``; 404 otherwise."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if api is not None and (path == "/api" or path.startswith("/api/")):
            return api(environ, start_response)
        name = "index.html" if path in ("/", "/index.html") else None
        if path.startswith(STATIC_PREFIX):
            name = path[len(STATIC_PREFIX) :]
        found = static_files().get(name) if name else None
        if found is None:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /, /api/runs, /metrics or /healthz\n"]
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"method not allowed: use GET\n"]
        content, content_type = found
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(content))),
            ("Cache-Control", "no-cache"),
            *_SECURITY_HEADERS,
        ]
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [content]

    return app
