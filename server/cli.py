"""The ``serve`` sub-command of ``inversion-monitor``.

Only argparse is imported here; each handler imports gRPC and the server
when it runs, so ``inversion-monitor --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.server.config import ServerConfig


def add_serve_command(subparsers: Any) -> None:
    """Add ``serve`` to an ``argparse`` sub-parsers object."""
    env = "INVERSION_MONITOR_SERVER_"
    serve = subparsers.add_parser(
        "serve",
        help="run the monitor server (gRPC ingest, SQLite or PostgreSQL, Prometheus /metrics)",
        description=(
            "Run the monitor server. Every flag can also be set with an environment variable "
            f"{env}<FLAG> (e.g. {env}GRPC_ADDRESS); a flag wins over the variable. With port 0 "
            "the server picks a free port; it prints the bound addresses on start-up."
        ),
    )
    serve.add_argument(
        "--grpc-address",
        metavar="HOST:PORT",
        help="gRPC listen address (default 127.0.0.1:50051)",
    )
    serve.add_argument(
        "--http-address",
        metavar="HOST:PORT",
        help="HTTP address of the live page (/), /api/runs, /metrics and /healthz "
        "(default 127.0.0.1:9464; 'off' disables)",
    )
    serve.add_argument(
        "--db",
        metavar="PATH|URL",
        help="SQLite database file (default ./inversion-monitor.db; one server per file), or "
        "postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME (several servers may share it; "
        f"needs the 'postgres' extra); variable {env}DB",
    )
    serve.add_argument(
        "--token",
        dest="tokens",
        action="append",
        metavar="TOKEN",
        help="accept clients sending 'authorization: Bearer TOKEN' (repeatable; the "
        f"variable {env}TOKEN takes a comma-separated list); without one, no authentication",
    )
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="YAML/TOML file of tokens scoped to projects, read-only or read-write "
        "([[tokens]] token=..., projects=[...], access='read-only'|'read-write')",
    )
    serve.add_argument(
        "--writer-idle-timeout",
        metavar="DURATION",
        help="a (run, rank) stream whose writer was idle this long may be opened by another "
        "writer without takeover (default 5m)",
    )
    serve.add_argument(
        "--tls-cert", metavar="PEM", help="server certificate chain (with --tls-key)"
    )
    serve.add_argument("--tls-key", metavar="PEM", help="server private key (with --tls-cert)")
    serve.add_argument(
        "--retention",
        metavar="DURATION",
        help="how long an idle run stays on /metrics: seconds or 90s/15m/1h/2d (default 1h)",
    )
    serve.add_argument(
        "--extended-metrics",
        action="store_true",
        default=None,
        help="also export Spearman CI bounds, entropy p10/p50/p90, loss and run_info per run",
    )
    serve.add_argument(
        "--component-metrics",
        action="store_true",
        default=None,
        help="also export rho and score per (layer, projection), at most 32 series a run",
    )
    serve.add_argument("--max-message-bytes", type=int, metavar="N", help="default 4 MiB")
    serve.add_argument("--max-records-per-push", type=int, metavar="N", help="default 1000")
    serve.add_argument("--max-active-runs", type=int, metavar="N", help="default 10000")
    serve.add_argument(
        "--alerts-config",
        metavar="FILE",
        help="detector settings, YAML or TOML (default: built-in defaults)",
    )
    serve.add_argument(
        "--no-alerts",
        dest="alerts",
        action="store_false",
        default=None,
        help="run no server-side detectors (no alerts, no alert_active series)",
    )
    serve.add_argument(
        "--alertmanager-url",
        metavar="URL",
        help="post alerts to this Alertmanager (e.g. http://127.0.0.1:9093)",
    )
    serve.add_argument(
        "--metrics-token",
        action="store_true",
        default=None,
        help="/metrics names every project's runs: answer it only with a token that reads "
        "every project (Prometheus: authorization.credentials); needs --token/--token-file",
    )
    serve.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        metavar="NAME",
        help="without tokens, /api answers only a Host that is an IP address, localhost, the "
        "--http-address host or a NAME given here (repeatable; guards against DNS rebinding)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(handler=run_serve)


# ---------------------------------------------------------------- serve


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """The :class:`ServerConfig` from parsed ``serve`` arguments over the environment."""
    from inversion_monitor.server.config import ServerConfig

    names = (
        "grpc_address",
        "http_address",
        "db",
        "tokens",
        "token_file",
        "writer_idle_timeout",
        "tls_cert",
        "tls_key",
        "retention",
        "extended_metrics",
        "component_metrics",
        "max_message_bytes",
        "max_records_per_push",
        "max_active_runs",
        "alerts_config",
        "alertmanager_url",
        "alerts",
        "metrics_token",
        "allowed_hosts",
    )
    return ServerConfig.from_sources({n: getattr(args, n, None) for n in names}, environ)


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``inversion-monitor serve``: runs until SIGTERM or SIGINT."""
    import asyncio
    import logging

    from inversion_monitor.server.settings_file import ServerConfigError

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = serve_config(args, os.environ)
        if config.alerts:
            from inversion_monitor.server.alert_config import load_alerts_config

            load_alerts_config(config.alerts_config)
    except ServerConfigError as exc:
        print(f"inversion-monitor serve: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> int:
    import asyncio
    import signal

    from inversion_monitor.server.app import AsyncMonitorServer
    from inversion_monitor.server.schema import StoreError

    # This process only serves: hand the GIL between the event loop and the
    # writer thread every 0.5 ms instead of 5 ms, which halves the server-side
    # Push latency under load (benchmarks/bench_server.py).
    sys.setswitchinterval(0.0005)
    server = AsyncMonitorServer(config)
    try:
        await server.start()
    except (OSError, RuntimeError, StoreError) as exc:
        reason = explain_start_error(exc, _addresses(config))
        print(f"inversion-monitor serve: cannot start: {reason}", file=sys.stderr)
        return 1
    print(f"grpc listening on {server.grpc_target}", flush=True)
    if server.http_url is not None:
        print(f"http listening on {server.http_url}", flush=True)
        hint = (
            "  (it asks for a token, or add #token=<token> to the URL)"
            if config.tokens or config.scoped_tokens
            else ""
        )
        print(f"live page: {server.page_url}{hint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("inversion-monitor serve: shutting down", file=sys.stderr, flush=True)
    await server.stop()
    print("inversion-monitor serve: stopped", file=sys.stderr, flush=True)
    return 0


def _addresses(config: ServerConfig) -> list[str]:
    return [a for a in (config.grpc_address, config.http_address) if a]


def explain_start_error(exc: BaseException, addresses: Sequence[str] = ()) -> str:
    """One sentence for a server that did not start; a busy port names the fix.

    >>> explain_start_error(RuntimeError("Failed to bind to address 127.0.0.1:50051; set ..."))
    'address 127.0.0.1:50051 is already in use: stop the process using it, or pass another \
address (--grpc-address / --http-address; port 0 picks a free one)'
    """
    text = str(exc)
    lowered = text.lower()
    if "failed to bind" in lowered or "address already in use" in lowered:
        address = ""
        if "address " in text:
            address = text.split("address ", 1)[1].split(";", maxsplit=1)[0].strip()
        if address:
            where = f"address {address}"
        else:
            where = "one of the addresses " + ", ".join(addresses) if addresses else "an address"
        return (
            f"{where} is already in use: stop the process using it, or pass another address "
            "(--grpc-address / --http-address; port 0 picks a free one)"
        )
    return text
