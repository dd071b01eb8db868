"""The command line's side of reading a server: shared options and one error handling.

``show`` and ``runs`` take the same ``--endpoint``, ``--token``, ``--tls-ca``
and ``--timeout`` options (:func:`add_read_options`), open a
:class:`~inversion_monitor.telemetry.reader.RunReader` the same way (:func:`open_reader`)
and turn every failure into one :class:`~inversion_monitor.app.errors.UserError`
sentence naming the cause and the fix (:func:`explain_read_error`).

>>> explain_read_error("UNAVAILABLE", "connection refused", "127.0.0.1:1")[:40]
'no monitor server answers at 127.0.0.1:1'
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from inversion_monitor.app.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from inversion_monitor.telemetry.reader import RunReader

ENDPOINT_ENV = "INVERSION_MONITOR_ENDPOINT"
TOKEN_ENV = "INVERSION_MONITOR_TOKEN"


def add_read_options(parser: argparse.ArgumentParser) -> None:
    """``--endpoint``, ``--token``, ``--tls-ca`` and ``--timeout`` (argparse only)."""
    parser.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV, "127.0.0.1:50051"),
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"server address, or replicas of one store tried in turn (default ${ENDPOINT_ENV} "
        "or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="use TLS, trusting this CA or self-signed certificate",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")


def explain_read_error(code: str, details: str, endpoint: str, run: str | None = None) -> str:
    """One sentence naming the cause of a failed read and the fix."""
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (
            f"no monitor server answers at {endpoint} ({code}: {details}): start one with "
            "'inversion-monitor serve' or pass --endpoint HOST:PORT"
        )
    if code == "NOT_FOUND" and run is not None:
        return (
            f"the server at {endpoint} has no run {run!r}: list the runs with "
            f"'inversion-monitor runs --endpoint {endpoint}'"
        )
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return (
            f"the server at {endpoint} refused the request ({code}: {details}): pass its token "
            f"with --token or {TOKEN_ENV}"
        )
    return f"the server at {endpoint} answered {code} ({details}): see its log"


def open_reader(args: argparse.Namespace) -> RunReader:
    """A reader for the parsed options; bad options become :class:`UserError`."""
    from inversion_monitor.telemetry.endpoints import parse_endpoints
    from inversion_monitor.telemetry.reader import RunReader
    from inversion_monitor.telemetry.transport import Transport

    tls_ca: Path | None = args.tls_ca
    if tls_ca is not None and not tls_ca.is_file():
        raise UserError(f"--tls-ca file {tls_ca} does not exist: pass the server's CA file")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be a positive number of seconds")
    try:
        transports = [  # several replicas of one store: the first that answers
            Transport.create(e, tls=tls_ca if tls_ca is not None else False, token=args.token)
            for e in parse_endpoints(args.endpoint)
        ]
    except ValueError as exc:
        raise UserError(f"{exc}".replace("endpoint=", "--endpoint ", 1)) from None
    return RunReader(transports, timeout_s=args.timeout)
